"""The Beam store writer against the local one: the same store, byte for byte."""

import filecmp
import sys

import pytest

pytest.importorskip("apache_beam")

from t5x_like.data import store as store_lib  # noqa: E402
from t5x_like.errors import UserError  # noqa: E402
from t5x_like.prepare import prepare  # noqa: E402
from t5x_like.prepare_beam import prepare_with_beam  # noqa: E402
from t5x_like.tasks.pretraining import DEFAULT_TASK  # noqa: E402


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_direct_runner_writes_the_local_writers_bytes(tmp_path):
    local, beam = tmp_path / "local", tmp_path / "beam"
    want = prepare(DEFAULT_TASK, "validation", str(local), workers=1, num_shards=3, seed=7,
                   progress=False)
    # Two source parts on Beam against one local worker: the bytes must not depend on how
    # the source was split.
    got = prepare_with_beam(DEFAULT_TASK, "validation", str(beam), runner="DirectRunner",
                            pipeline_args=["--direct_num_workers=1"], num_shards=3, seed=7,
                            source_parts=2, progress=False)
    assert got == want
    names = _files(local)
    assert names == _files(beam)
    assert len(names) == 1 + 2 * 3  # manifest + record file and index per shard
    for name in names:
        assert filecmp.cmp(local / name, beam / name, shallow=False), name
    assert not (beam / DEFAULT_TASK / "validation.partial").exists()

    store = store_lib.StoreSplit(str(beam), DEFAULT_TASK, "validation")
    store.verify()
    assert store.num_documents == want["documents"] > 500
    assert sorted(store.index[:, 1].tolist()) == list(range(store.num_documents))

    # A second run finds the finished store and leaves it alone.
    again = prepare_with_beam(DEFAULT_TASK, "validation", str(beam), runner="DirectRunner",
                              num_shards=3, seed=7, progress=False)
    assert again == want
    with pytest.raises(UserError, match="other settings"):
        prepare_with_beam(DEFAULT_TASK, "validation", str(beam), runner="DirectRunner",
                          num_shards=3, seed=8, progress=False)


def test_remote_runner_needs_shared_storage(tmp_path):
    with pytest.raises(UserError, match="shared storage"):
        prepare_with_beam(DEFAULT_TASK, "validation", str(tmp_path), runner="DataflowRunner")


def test_dataflow_without_the_gcp_client_names_it():
    import importlib.util

    if importlib.util.find_spec("google.cloud.dataflow") is not None:
        pytest.skip("Beam's [gcp] extra is installed here")
    with pytest.raises(UserError, match=r"apache-beam\[gcp\]"):
        prepare_with_beam(DEFAULT_TASK, "validation", "gs://bucket/stores",
                          runner="DataflowRunner")


def test_missing_beam_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # what an absent package looks like
    with pytest.raises(UserError, match=r"install the \[beam\] extra"):
        prepare_with_beam(DEFAULT_TASK, "validation", str(tmp_path), runner="DirectRunner")


def test_direct_runner_to_gcs_writes_the_same_objects(tmp_path):
    """Object stores have no folder rename: the store is copied out of .partial/, manifest
    last, against a real GCS JSON API server (fake-gcs-server on 127.0.0.1)."""
    from etils import epath
    from gcs_emulator import running

    local = tmp_path / "local"
    prepare(DEFAULT_TASK, "validation", str(local), workers=1, num_shards=2, progress=False)
    with running("t5x-like-beam") as gcs:
        got = prepare_with_beam(DEFAULT_TASK, "validation", "gs://t5x-like-beam/stores",
                                runner="DirectRunner", num_shards=2, progress=False)
        objects = sorted(gcs.objects("stores/"))
        prefix = f"stores/{DEFAULT_TASK}/validation/"
        names = _files(local / DEFAULT_TASK / "validation")
        assert objects == sorted(prefix + str(n) for n in names)  # nothing left in .partial/
        for name in names:
            remote = epath.Path(f"gs://t5x-like-beam/{prefix}{name}")
            assert remote.read_bytes() == (local / DEFAULT_TASK / "validation" / name
                                           ).read_bytes(), name
    assert got["shards"] == store_lib.read_manifest(local / DEFAULT_TASK / "validation")["shards"]
