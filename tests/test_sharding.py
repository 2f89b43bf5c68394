"""Sharding: presets and overrides, every array's placement, equality with one device, and
checkpoints restored across topologies.

The multi-device checks run once, in one subprocess with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a tiny T5 whose dims every mesh
axis divides and whose feed-forward and embedding kernels are large enough (>= 128) for
Adafactor to factor their second moments. The parent process only reads its JSON report.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, TINY_OVERRIDES
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning
from t5x_like.errors import UserError

# d_model 128, d_ff 256, 8 heads of 16: divisible by 8 on every sharded dim; the MLP, embedding
# and lm_head kernels have two dims >= 128, so Adafactor factors them.
MODEL = ["model.d_model=128", "model.d_ff=256", "model.num_heads=8", "model.d_kv=16"]
OVERRIDES = [o.removeprefix("--") for o in TINY_OVERRIDES] + MODEL
# name -> (rules preset, data, fsdp, tensor)
MESHES = {
    "data8": ("dp", 8, 1, 1),
    "fsdp8": ("fsdp", 1, 8, 1),
    "tensor8": ("tensor", 1, 1, 8),
    "2x2x2": ("fsdp_tensor", 2, 2, 2),
}


def _abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), partitioning.MESH_AXES,
                        axis_types=(AxisType.Auto,) * 3)


def _norm(spec) -> tuple:
    """A spec as a tuple without trailing Nones (P('a', None) and P('a') place alike)."""
    entries = [tuple(e) if isinstance(e, list | tuple) else e for e in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


# --------------------------------------------------------------------------- rules, in-process


def test_presets_map_logical_axes_as_documented():
    spec = ("embed", "heads", "kv")
    expect = {"dp": P(None, None, None), "fsdp": P("fsdp", None, None),
              "tensor": P(None, "tensor", None), "fsdp_tensor": P("fsdp", "tensor", None)}
    for name, rules in partitioning.PRESETS.items():
        assert partitioning.logical_to_mesh(spec, rules) == expect[name]
        assert partitioning.logical_to_mesh(("batch", "length"), rules) == P(("data", "fsdp"), None)
    # One mesh axis shards one dim only: a second dim asking for it gets nothing.
    rules = {**partitioning.PRESETS["fsdp_tensor"], "mlp": ("fsdp", "tensor")}
    assert partitioning.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_override_syntax():
    parsed = partitioning.parse_override(" embed=tensor, mlp=fsdp+tensor ,heads=none,vocab=")
    assert parsed == {"embed": ("tensor",), "mlp": ("fsdp", "tensor"), "heads": (), "vocab": ()}
    rules = partitioning.rules_from_config({"rules": "dp", "rules_override": "mlp=tensor"})
    assert rules["mlp"] == ("tensor",) and rules["embed"] == () and rules["heads"] == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ("embedd=fsdp", "unknown logical axis 'embedd'"),
        ("embed=model", "'model', which is not a mesh axis"),
        ("embed", "has no '='"),
        ("mlp=tensor+tensor", "an axis twice"),
    ],
)
def test_bad_overrides_are_one_sentence(text, message):
    with pytest.raises(UserError, match=message):
        partitioning.parse_override(text)


def test_bad_rules_in_a_config_stop_before_anything_compiles():
    from t5x_like import config as config_lib

    os.chdir(ROOT)
    with pytest.raises(UserError, match="mesh.rules must be one of"):
        config_lib.load_config(TINY_CONFIG, [*OVERRIDES, "mesh.rules=zero3"])
    with pytest.raises(UserError, match="unknown logical axis 'layer'"):
        config_lib.load_config(TINY_CONFIG, [*OVERRIDES, "mesh.rules_override=layer=fsdp"])


def test_an_unknown_logical_axis_in_a_module_is_an_error():
    from flax import nnx

    from t5x_like.models.layers import make_param

    class Typo(nnx.Module):
        def __init__(self, rngs):
            self.w = make_param(rngs, jax.nn.initializers.ones, (8, 4), ("embed", "hiddden"),
                                np.float32)

    params = nnx.state(nnx.eval_shape(lambda: Typo(nnx.Rngs(0))), nnx.Param)
    with pytest.raises(UserError, match=r"parameter w names the logical axis 'hiddden'"):
        partitioning.param_specs(params, _abstract_mesh(1, 1, 1))


def test_activations_are_pinned_by_the_rules_only_inside_a_step():
    """Hidden states [B, L, d] go batch-first over data and fsdp (T5X/MaxText's activation
    rule); logits add vocab over tensor; an axis that does not divide its dim is dropped
    (a micro-batch of 2 on data 2 x fsdp 2 keeps data only). Outside a step: untouched."""
    from t5x_like.models.activation_sharding import constrain

    mesh = _abstract_mesh(2, 2, 2)
    resolve = partitioning.activation_resolver(mesh, partitioning.PRESETS["fsdp_tensor"])
    assert resolve(("batch", "length", None), (8, 16, 32)).spec == P(("data", "fsdp"), None, None)
    assert resolve(("batch", "length", "vocab"), (8, 16, 64)).spec == P(("data", "fsdp"), None,
                                                                        "tensor")
    assert resolve(("batch", "length", None), (2, 16, 32)).spec == P("data", None, None)
    assert resolve(("batch", "length", "vocab"), (8, 16, 7)).spec == P(("data", "fsdp"), None,
                                                                       None)
    tensor = partitioning.activation_resolver(_abstract_mesh(1, 1, 8), partitioning.PRESETS["dp"])
    assert tensor(("batch", "length", "vocab"), (8, 16, 64)).spec == P(None, None, None)
    x = np.ones((8, 16, 32), np.float32)
    assert constrain(x, ("batch", "length", None)) is x  # no step, no mesh: a no-op


# Every T5 parameter kind of the test model on the 2x2x2 mesh under fsdp_tensor, written out:
# (path suffix, logical names as the module declares them, expected mesh spec).
EXPECTED_2X2X2 = {
    "token_embedder/embedding": P("tensor", "fsdp"),  # [vocab 8192, embed 128]
    "lm_head": P("fsdp", "tensor"),  # [embed, vocab]
    "relpos_bias/embedding": P("fsdp", "tensor"),  # [buckets 32, heads]: fsdp by ZeRO-3 fallback
    "query": P("fsdp", "tensor", None),  # [embed, heads, kv]
    "key": P("fsdp", "tensor", None),
    "value": P("fsdp", "tensor", None),
    "out": P("tensor", None, "fsdp"),  # [heads, kv, embed]
    "wi_0": P("fsdp", "tensor"),  # [embed, mlp]
    "wi_1": P("fsdp", "tensor"),
    "wo": P("tensor", "fsdp"),  # [mlp, embed]
    "scale": P("fsdp"),  # [embed]
}
EXPECTED_FSDP8 = {  # ZeRO-3 alone: everything on fsdp, buckets 32 the only dim 8 divides there
    "token_embedder/embedding": P(None, "fsdp"),
    "lm_head": P("fsdp", None),
    "relpos_bias/embedding": P("fsdp", None),
    "query": P("fsdp", None, None), "key": P("fsdp", None, None), "value": P("fsdp", None, None),
    "out": P(None, None, "fsdp"),
    "wi_0": P("fsdp", None), "wi_1": P("fsdp", None), "wo": P(None, "fsdp"),
    "scale": P("fsdp"),
}
EXPECTED_TENSOR8 = {
    "token_embedder/embedding": P("tensor", None),
    "lm_head": P(None, "tensor"),
    "relpos_bias/embedding": P(None, "tensor"),
    "query": P(None, "tensor", None), "key": P(None, "tensor", None),
    "value": P(None, "tensor", None), "out": P("tensor", None, None),
    "wi_0": P(None, "tensor"), "wi_1": P(None, "tensor"), "wo": P("tensor", None),
    "scale": P(),
}
EXPECTED = {"data8": {}, "fsdp8": EXPECTED_FSDP8, "tensor8": EXPECTED_TENSOR8,
            "2x2x2": EXPECTED_2X2X2}


def _expected_spec(table: dict, path: str) -> tuple:
    (key,) = [k for k in table if path == k or path.endswith("/" + k)] or [None]
    assert key is not None or not table, f"no expected spec written for {path}"
    return _norm(table[key]) if key else ()


@pytest.fixture(scope="module")
def tiny_family():
    from t5x_like import config as config_lib
    from t5x_like.data.vocab import get_vocabulary
    from t5x_like.families import get_family

    os.chdir(ROOT)
    config = config_lib.load_config(TINY_CONFIG, OVERRIDES)
    vocabulary = get_vocabulary(None)
    return get_family(config_lib.resolve(config, vocabulary.vocab_size), vocabulary)


@pytest.mark.parametrize("name", list(MESHES))
def test_every_parameter_spec_is_what_the_rules_say(tiny_family, name):
    preset, *sizes = MESHES[name]
    specs = partitioning.param_specs(tiny_family.abstract_params, _abstract_mesh(*sizes),
                                     partitioning.PRESETS[preset])
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): s
            for p, s in jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda x: isinstance(x, P))}
    assert len(flat) == 29  # embedding, lm_head, 2 relpos, 2 final norms, 9 enc + 14 dec
    for path, spec in flat.items():
        assert _norm(spec) == _expected_spec(EXPECTED[name], path), path


def test_adafactor_statistics_keep_the_sharding_of_the_dims_they_keep(tiny_family):
    import optax

    mesh = _abstract_mesh(2, 2, 2)
    specs = partitioning.param_specs(tiny_family.abstract_params, mesh)
    params = jax.eval_shape(tiny_family.init, jax.random.key(0))
    state = partitioning.opt_state_specs(optax.adafactor(0.01), params, specs, mesh)[0]
    wi = ("encoder", "layers", 0, "mlp", "wi_0")  # [embed 128, mlp 256], factored

    def at(tree, path):
        for k in path:
            tree = tree[k]
        return tree

    # v_row averages over the largest dim (mlp) and keeps embed; v_col averages over embed.
    assert _norm(at(state.v_row, wi)) == ("fsdp",)
    assert _norm(at(state.v_col, wi)) == ("tensor",)
    emb = ("token_embedder", "embedding")  # [vocab 8192, embed 128]: v_row keeps embed
    assert _norm(at(state.v_row, emb)) == ("fsdp",) and _norm(at(state.v_col, emb)) == ("tensor",)
    q = ("encoder", "layers", 0, "attention", "query")  # [128, 8, 16]: 8 < 128, not factored
    assert _norm(at(state.v, q)) == ("fsdp", "tensor")
    assert _norm(state.count) == ()


def test_a_dim_the_mesh_does_not_divide_stays_whole_and_says_so(tiny_family, capsys):
    # 8 heads over tensor=16 (abstract mesh, no devices needed): heads whole, the rest sharded.
    specs = partitioning.param_specs(tiny_family.abstract_params, _abstract_mesh(1, 1, 16))
    query = specs["encoder"]["layers"][0]["attention"]["query"]
    assert _norm(query) == ()
    assert _norm(specs["encoder"]["layers"][0]["mlp"]["wi_0"]) == (None, "tensor")
    err = capsys.readouterr().err
    assert "attention/query dim 1 (size 8) is not divisible by mesh axes ('tensor',)" in err


# --------------------------------------------------------------------------- 8 fake devices

SCRIPT = textwrap.dedent(
    """
    import json, tempfile
    import jax, numpy as np
    from t5x_like import config as config_lib
    from t5x_like.checkpoints import Checkpoints
    from t5x_like.errors import UserError
    from t5x_like.experiment import build
    from t5x_like.train import make_train_step

    def cfg(preset, data, fsdp, tensor, *extra):
        return config_lib.load_config(CONFIG, OVERRIDES + [
            f"mesh.rules={preset}", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}", *extra])

    def spec_of(sharding):
        return [list(e) if isinstance(e, tuple) else e for e in sharding.spec]

    def wrong_placements(exp, state):
        # every array of the state against the sharding the rules gave it
        bad = []
        for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(state),
                                      jax.tree.leaves(exp.state_shardings), strict=True):
            if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
                bad.append(f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {want.spec}")
        return bad

    rng = np.random.default_rng(0)
    out = {"runs": {}, "errors": {}}
    reference = None
    for name, (preset, data, fsdp, tensor) in [("one", ("dp", 1, 1, 1)), *MESHES.items()]:
        devices = jax.devices()[: data * fsdp * tensor]
        exp = build(cfg(preset, data, fsdp, tensor), devices)
        if reference is None:
            shape = (exp.config.data.batch_size, exp.family.raw_length)
            tokens = [rng.integers(2, exp.vocabulary.vocab_size - 100, shape, dtype=np.int32)
                      for _ in range(3)]
        state = exp.init_state()
        step = make_train_step(exp)
        losses = []
        for t in tokens:
            state, metrics = step(state, {"tokens": jax.device_put(t, exp.batch_sharding)})
            losses.append(float(metrics["loss"]))
        host = jax.device_get(state)
        if reference is None:
            reference = host
        diffs = [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                 for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(reference), strict=True)]
        out["runs"][name] = {
            "losses": losses,
            "max_state_diff": max(diffs),
            "compiled": step._cache_size(),
            "wrong_placements": wrong_placements(exp, state),
            "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(state)}),
            "batch_spec": spec_of(exp.batch_sharding),
            "param_specs": {jax.tree_util.keystr(p, simple=True, separator="/"): spec_of(x.sharding)
                            for p, x in jax.tree_util.tree_leaves_with_path(state["params"])},
            "opt_specs": {jax.tree_util.keystr(p): spec_of(x.sharding)
                          for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])},
            "shard_bytes": max(s.data.nbytes for x in jax.tree.leaves(state["params"])
                               for s in x.addressable_shards),
        }

    # Checkpoints across topologies: 4x2 (fsdp) -> 2x4 (fsdp) -> 2x1x4 (tensor) -> 1 device.
    workdir = tempfile.mkdtemp()
    exp = build(cfg("fsdp", 4, 2, 1), jax.devices())
    state = exp.init_state()
    step = make_train_step(exp)
    for t in tokens[:2]:
        state, _ = step(state, {"tokens": jax.device_put(t, exp.batch_sharding)})
    saved = jax.device_get(state)
    ckpt = Checkpoints(workdir)
    ckpt.save(2, state, {"batches_consumed": 2})
    ckpt.close()
    out["restores"] = {}
    for name, args, n in [("2x4", ("fsdp", 2, 4, 1), 8), ("2x1x4", ("tensor", 2, 1, 4), 8),
                          ("one", ("dp", 1, 1, 1), 1)]:
        exp = build(cfg(*args), jax.devices()[:n])
        ckpt = Checkpoints(workdir, read_only=True)
        restored, meta = ckpt.restore_latest(exp.abstract_state())
        ckpt.close()
        host = jax.device_get(restored)
        out["restores"][name] = {
            "identical": all(np.array_equal(a, b) for a, b in
                             zip(jax.tree.leaves(host), jax.tree.leaves(saved), strict=True)),
            "leaves": len(jax.tree.leaves(host)),
            "meta": meta,
            "wrong_placements": wrong_placements(exp, restored),
            "query_spec": spec_of(restored["params"]["encoder"]["layers"][0]["attention"]
                                  ["query"].sharding),
        }

    # Clear errors: a batch the data axes do not divide; a mesh axis the rules never use.
    for name, config in [("batch", cfg("tensor", 4, 1, 2, "data.batch_size=6")),
                         ("unused_axis", cfg("fsdp", 1, 4, 2))]:
        try:
            build(config, jax.devices())
            out["errors"][name] = None
        except UserError as e:
            out["errors"][name] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    script = (f"CONFIG = {TINY_CONFIG!r}\nOVERRIDES = {OVERRIDES!r}\nMESHES = {MESHES!r}\n"
              + SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("name", list(MESHES))
def test_three_steps_on_each_mesh_match_one_device(eight_devices, name):
    one, run = eight_devices["runs"]["one"], eight_devices["runs"][name]
    np.testing.assert_allclose(run["losses"], one["losses"], rtol=0, atol=1e-5)
    assert run["losses"][2] < run["losses"][0]  # it trains (Adafactor, lr 0.01)
    assert run["max_state_diff"] <= 1e-5  # params and every optimizer statistic
    assert run["compiled"] == 1  # one executable for all three steps
    assert run["wrong_placements"] == []
    assert run["devices"] == [8]


@pytest.mark.parametrize("name", list(MESHES))
def test_each_array_is_placed_as_the_rules_say(eight_devices, name):
    run = eight_devices["runs"][name]
    preset, data, fsdp, tensor = MESHES[name]
    assert run["batch_spec"] == [["data", "fsdp"]]
    for path, spec in run["param_specs"].items():
        assert _norm(spec) == _expected_spec(EXPECTED[name], path), path
    # Optimizer state: Adafactor's full-size statistics and its factored row/column vectors.
    opt = run["opt_specs"]
    wi = "['encoder']['layers'][0]['mlp']['wi_0']"
    q = "['encoder']['layers'][0]['attention']['query']"
    expect = {
        "data8": {"v_row": (), "v_col": (), "v_q": ()},
        "fsdp8": {"v_row": ("fsdp",), "v_col": (), "v_q": ("fsdp",)},
        "tensor8": {"v_row": (), "v_col": ("tensor",), "v_q": (None, "tensor")},
        "2x2x2": {"v_row": ("fsdp",), "v_col": ("tensor",), "v_q": ("fsdp", "tensor")},
    }[name]
    assert _norm(opt[f"[0].v_row{wi}"]) == expect["v_row"]
    assert _norm(opt[f"[0].v_col{wi}"]) == expect["v_col"]
    assert _norm(opt[f"[0].v{q}"]) == expect["v_q"]
    assert _norm(opt["[0].count"]) == ()
    # Sharding shrinks the largest shard a device holds (the embedding: 8192 x 128 floats).
    full = 8192 * 128 * 4
    assert run["shard_bytes"] == (full if name == "data8" else full // 8 if name != "2x2x2"
                                  else full // 4)


def test_a_checkpoint_restores_on_other_meshes_bit_for_bit(eight_devices):
    restores = eight_devices["restores"]
    assert set(restores) == {"2x4", "2x1x4", "one"}
    for name, r in restores.items():
        assert r["identical"], name
        assert r["leaves"] > 29
        assert r["meta"] == {"batches_consumed": 2}
        assert r["wrong_placements"] == [], name
    assert restores["2x4"]["query_spec"] == ["fsdp", None, None]
    assert restores["2x1x4"]["query_spec"] == [None, "tensor", None]


def test_batch_that_does_not_divide_and_unused_axis_are_one_sentence(eight_devices):
    errors = eight_devices["errors"]
    assert errors["batch"] == (
        "data.batch_size=6 / optimizer.grad_accum_steps=1 = 6 examples per micro-batch cannot "
        "be split evenly over 4 data-parallel devices; make it a multiple of 4")
    assert errors["unused_axis"].startswith(
        "mesh.tensor=2 but no logical axis is sharded over 'tensor' with these rules")
