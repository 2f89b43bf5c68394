"""T5X checkpoints in and out, against a checkpoint and logits that T5X's own code wrote.

tests/data/t5x/ (see its README): T5X's ``Checkpointer`` saved a tiny T5 1.1
(``t5x/examples/t5/network.py``) after one Adafactor step, and the logits of T5X's model on a
fixed batch. Ours must give the same logits from the imported parameters, and
import -> export -> import must reproduce every array exactly.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_cli

from t5x_like.errors import UserError
from t5x_like.interop import hf_common as C
from t5x_like.interop import t5x
from t5x_like.models.t5 import T5

FIXTURE = Path(__file__).parent / "data" / "t5x"
CHECKPOINT = FIXTURE / "checkpoint_1"


def _logits(params_t5x: dict, scan_layers: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    config = t5x.config_from_params(params_t5x, scan_layers=scan_layers)
    model = C.merge(C.abstract_model(T5, config)[0], t5x.params_for(params_t5x, config))
    batch = np.load(FIXTURE / "logits.npz")
    ours = np.asarray(model(batch["encoder_input_tokens"], batch["decoder_input_tokens"]))
    return ours, batch["logits"], batch["decoder_target_tokens"] > 0


@pytest.mark.parametrize("scan_layers", [False, True])
def test_imported_logits_match_t5x(scan_layers):
    params, step, has_moments = t5x.read_checkpoint(CHECKPOINT)
    assert step == 1 and has_moments
    config = t5x.config_from_params(params)
    assert (config.d_model, config.num_heads, config.d_kv, config.d_ff) == (16, 2, 8, 32)
    assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
    ours, theirs, weights = _logits(params, scan_layers)
    # T5X masks padded decoder positions by target; their logits carry no loss weight
    np.testing.assert_allclose(ours[weights], theirs[weights], atol=1e-4, rtol=0)
    assert np.abs(theirs[weights]).max() > 0.5  # not a degenerate (all-zero) reference


def test_scanned_t5x_layout_reads_as_unrolled(tmp_path):
    """scalable_t5's scanned layout: layers stacked on axis 1, one relpos table per layer."""
    params, _, _ = t5x.read_checkpoint(CHECKPOINT)
    scanned = {}
    for stack in ("encoder", "decoder"):
        names = sorted({k.split("/", 2)[2] for k in params if k.startswith(f"{stack}/layers_")})
        for rest in names:
            layers = [params[f"{stack}/layers_{i}/{rest}"] for i in range(2)]
            scanned[f"{stack}/{stack}/{rest}"] = np.stack(layers, axis=1)
        table = params[f"{stack}/relpos_bias/rel_embedding"]
        scanned[f"{stack}/{stack}/relpos_bias/rel_embedding"] = np.stack([table, table], axis=1)
    scanned.update({k: v for k, v in params.items() if "/layers_" not in k and "relpos" not in k})
    t5x.write_checkpoint(scanned, 7, tmp_path)
    read, step, _ = t5x.read_checkpoint(tmp_path)
    assert step == 7 and set(read) == set(params)
    for name in params:
        np.testing.assert_array_equal(read[name], params[name])

    scanned["encoder/encoder/relpos_bias/rel_embedding"][:, 1] += 1.0
    t5x.write_checkpoint(scanned, 8, tmp_path)
    with pytest.raises(UserError, match="relative-position table in each layer"):
        t5x.read_checkpoint(tmp_path / "checkpoint_8")


def test_export_then_import_round_trips_exactly(tmp_path):
    """Our parameters -> T5X's files -> our parameters, bit for bit (scanned and not)."""
    original, _, _ = t5x.read_checkpoint(CHECKPOINT)
    for step, scan_layers in ((3, False), (4, True)):
        config = t5x.config_from_params(original, scan_layers=scan_layers)
        ours = t5x.params_for(original, config)
        t5x.write_checkpoint(t5x.t5x_params(ours, config), step, tmp_path)
        read, read_step, _ = t5x.read_checkpoint(tmp_path / f"checkpoint_{step}")
        assert read_step == step and set(read) == set(original)
        again = t5x.params_for(read, config)
        for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(ours),
                                     jax.tree_util.tree_leaves_with_path(again), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # two CLI processes, an orbax save and restore: ~30 s of CPU
def test_cli_import_export_round_trip(tmp_path):
    workdir, out = tmp_path / "imported", tmp_path / "exported"
    result = run_cli("import-t5x", str(CHECKPOINT), str(workdir),
                     "--config.data.inputs_length=32", "--config.data.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer state at step 1 is not carried over" in result.stdout
    result = run_cli("export-t5x", str(workdir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    exported, step, _ = t5x.read_checkpoint(out)
    original, _, _ = t5x.read_checkpoint(CHECKPOINT)
    assert step == 0 and set(exported) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    # T5X's zero Adafactor state: a second moment per (unfactored) parameter, no momentum
    from flax import serialization

    contents = serialization.msgpack_restore((out / "checkpoint_0" / "checkpoint").read_bytes())
    moments = contents["optimizer"]["state"]["param_states"]["decoder"]["decoder_norm"]["scale"]
    assert moments["v"]["metadata"]["shape"] == [16] and moments["m"].shape == (1,)

    again = tmp_path / "again"
    t5x.import_t5x(out, again, ["data.inputs_length=32", "data.batch_size=8"])
    from t5x_like.evaluation.driver import load_checkpoint

    _, first, _ = load_checkpoint(workdir)
    _, second, _ = load_checkpoint(again)
    flat1, flat2 = ({jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(p)}
                    for p in (first, second))
    assert set(flat1) == set(flat2)
    for key in flat1:
        np.testing.assert_array_equal(np.asarray(flat1[key]), np.asarray(flat2[key]))


def test_import_refuses_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="holds no T5X checkpoint"):
        t5x.read_checkpoint(tmp_path)
