"""Multislice meshes (``mesh.dcn_data`` / ``mesh.dcn_fsdp``).

The layout is checked on real TPU device descriptions of two slices (``jax.experimental.
topologies`` with libtpu, on this CPU host): each slice's chips form a contiguous block of the
data (or fsdp) axis, built by ``mesh_utils.create_hybrid_device_mesh``. The numerics run on 8
fake CPU devices split into two groups standing in for slices: ``dcn_data=2`` and ``dcn_fsdp=2``
train as one slice does.
"""

from __future__ import annotations

import textwrap

import ml_collections
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES
from family_runs import on_8_devices

pytest.importorskip("libtpu")


def _mesh_config(**sizes) -> ml_collections.ConfigDict:
    base = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1)
    return ml_collections.ConfigDict({**base, **sizes})


@pytest.fixture(scope="module")
def two_slices():
    from t5x_like import aot

    return aot.topology_devices("v5p:2x2x2", num_slices=2)


def test_jax_make_mesh_refuses_two_slices_which_is_why_dcn_exists(two_slices):
    import jax

    with pytest.raises(Exception):  # noqa: B017  (JAX's own refusal; its type is not public)
        jax.make_mesh((16,), ("data",), devices=two_slices)


def test_dcn_data_puts_each_slice_in_one_block_of_the_data_axis(two_slices):
    from t5x_like import partitioning

    mesh = partitioning.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2, dcn_data=2), two_slices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
    # every fsdp and tensor group stays inside one slice (ICI); only data crosses (DCN)
    for row in slices:
        assert len(set(row.ravel())) == 1
    assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in two_slices)
    np.testing.assert_array_equal(partitioning.slice_of_devices(mesh), slices.ravel())


def test_dcn_fsdp_splits_the_fsdp_axis_across_slices(two_slices):
    from t5x_like import partitioning

    mesh = partitioning.make_mesh(_mesh_config(data=1, fsdp=-1, dcn_fsdp=2), two_slices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices).ravel()
    np.testing.assert_array_equal(slices, [0] * 8 + [1] * 8)


@pytest.mark.parametrize("sizes, message", [
    (dict(), "on 2 slice(s) but mesh.dcn_data * mesh.dcn_fsdp = 1"),
    (dict(dcn_data=4), "on 2 slice(s) but mesh.dcn_data * mesh.dcn_fsdp = 4"),
    (dict(data=4, fsdp=4, dcn_data=2), "needs 16 devices per slice but 8 are available per "
                                       "slice"),
])
def test_a_mesh_that_does_not_match_the_slices_is_one_sentence(two_slices, sizes, message):
    from t5x_like import partitioning
    from t5x_like.errors import UserError

    with pytest.raises(UserError, match=message.replace("*", r"\*").replace("(", r"\(")
                       .replace(")", r"\)")):
        partitioning.make_mesh(_mesh_config(**sizes), two_slices)


def test_dcn_sizes_are_validated_with_the_config():
    from t5x_like import config as config_lib
    from t5x_like.errors import UserError

    with pytest.raises(UserError, match="mesh.dcn_data must be positive"):
        config_lib.load_config(TINY_CONFIG, ["mesh.dcn_data=0"])


SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    rng = np.random.default_rng(0)
    out = {}
    tokens = None
    for name, mesh in MESHES:
        config = config_lib.load_config(CONFIG, OVERRIDES + ["mesh.rules=fsdp"] + mesh)
        exp = build(config, jax.devices())
        if tokens is None:
            shape = (exp.config.data.batch_size, exp.family.raw_length)
            tokens = [rng.integers(2, exp.vocabulary.vocab_size - 100, shape, dtype=np.int32)
                      for _ in range(3)]
        state, step, losses = exp.init_state(), make_train_step(exp), []
        for t in tokens:
            state, metrics = step(state, {"tokens": jax.device_put(t, exp.batch_sharding)})
            losses.append(float(metrics["loss"]))
        out[name] = {"losses": losses,
                     "params": [np.asarray(x, np.float64).ravel().tolist()[:64]
                                for x in jax.tree.leaves(jax.device_get(state["params"]))],
                     "grid": [[d.id for d in row] for row in
                              exp.mesh.devices.reshape(exp.mesh.devices.shape[0], -1)],
                     "shape": dict(exp.mesh.shape)}
    print("RESULT" + json.dumps(out))
    """
)


ONE_SLICE = ("one_slice", ["mesh.data=4", "mesh.fsdp=2"])
DCN_DATA = ("dcn_data_2", ["mesh.data=2", "mesh.fsdp=2", "mesh.dcn_data=2"])
DCN_FSDP = ("dcn_fsdp_2", ["mesh.data=4", "mesh.fsdp=1", "mesh.dcn_fsdp=2"])


def _runs(meshes) -> dict:
    overrides = [o.removeprefix("--config.") for o in TINY_OVERRIDES]
    return on_8_devices(f"CONFIG = {TINY_CONFIG!r}\nOVERRIDES = {overrides!r}\n"
                        f"MESHES = {meshes!r}\n" + SCRIPT, ROOT)


@pytest.fixture(scope="module")
def cpu_runs():
    return _runs([ONE_SLICE, DCN_DATA])


def test_fake_slices_are_equal_groups_of_consecutive_devices(cpu_runs):
    run = cpu_runs["dcn_data_2"]
    assert run["shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    first_slice, second_slice = run["grid"][:2], run["grid"][2:]
    assert sorted(sum(first_slice, [])) == [0, 1, 2, 3]
    assert sorted(sum(second_slice, [])) == [4, 5, 6, 7]


def _same_training(run: dict, one_slice: dict) -> None:
    # (one slice trains as one device does: tests/test_sharding.py)
    np.testing.assert_allclose(run["losses"], one_slice["losses"], rtol=0, atol=1e-5)
    for a, b in zip(run["params"], one_slice["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert run["losses"][2] < run["losses"][0]  # it trains


def test_dcn_data_2_trains_as_one_slice(cpu_runs):
    _same_training(cpu_runs["dcn_data_2"], cpu_runs["one_slice"])


@pytest.mark.slow
def test_dcn_fsdp_2_trains_as_one_slice():
    runs = _runs([ONE_SLICE, DCN_FSDP])
    assert runs["dcn_fsdp_2"]["shape"] == {"data": 4, "fsdp": 2, "tensor": 1}
    _same_training(runs["dcn_fsdp_2"], runs["one_slice"])
