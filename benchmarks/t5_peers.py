"""Training throughput of our T5 against transformers' PyTorch and Flax T5, on one config.

    make bench                                    # = .venv/bin/python benchmarks/t5_peers.py
    .venv/bin/python benchmarks/t5_peers.py --steps 3 --warmup 1 --only ours   # a quick look

Each implementation runs in its own subprocess, one after another, and reports one JSON line:
the median wall time of ``--steps`` training steps (forward + backward + AdamW update, float32,
lr 1e-4, no weight decay) after ``--warmup`` steps, each step synchronised
(``jax.block_until_ready`` on the new state and the loss; ``loss.item()`` in PyTorch, which
computes eagerly on CPU anyway). The JAX steps are timed through the executable that
``jitted.lower(...).compile()`` returns (the same one a call would build; calling the jitted
function after ``compile()`` would compile it a second time).

Rows: ``ours`` (the ``small`` preset's layout: layers unrolled, ``train.steps_per_call=10``
steps a compiled call, glibc advising huge pages for its large blocks: what ``t5x-like train``
runs), ``ours_small_pages`` (the same with glibc as it is, ``T5X_LIKE_HUGE_PAGES=0``: the
huge pages' A/B), ``ours_keep_freed`` (keeping freed memory, ``T5X_LIKE_KEEP_FREED_MEMORY=1``:
the allocator's A/B), ``ours_one_step_a_call`` (``train.steps_per_call=1``), ``flax``, ``torch``,
and ``ours_scanned``, a diagnostic: ours with its layers scanned and ``remat_policy=dots``,
as the ``large`` preset runs them. ``--repeats``
rounds (default 3) run every row in turn
(A B C, A B C, ...); each ratio is taken within a round and reported as the median with its
min and max, so one lucky or unlucky run cannot set the number. Before each run the
driver waits (``--quiet-wait`` seconds at most) for other processes to leave the CPUs, and each
row reports the share of the cores other processes took during its timed steps (``others'
CPU``): other engineers' test suites share this machine.

The config is T5 v1.1 (gated-gelu, untied embeddings, no dropout): d_model 256, d_kv 64,
4 heads, d_ff 1024, 4 + 4 layers, vocab 32128, batch 8, inputs 512, targets 114. Tokens/s
counts ``batch * (512 + 114)`` tokens per step for all three. Ours receives raw 568-token chunks
and span-corrupts them inside its jitted step (inputs 512 / targets 114); the peers receive
ready random inputs and targets of those shapes.

Memory, per process: ``peak RSS delta`` is ``ru_maxrss`` at the end minus the RSS just before
the model is built (imports and the synthetic batch excluded; weights, optimizer state,
compilation and activations included). For the two JAX implementations we also report XLA's
``memory_analysis()`` of the compiled train step: argument + output + temp bytes (the
donated state is counted in both argument and output; ``alias`` says how much of it is shared).

Results: a table on stdout and ``benchmarks/results.json``; the record is ``RESULTS.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from common import (
    ROOT,
    current_rss_bytes,
    environment,
    memory_growth,
    our_rss_baseline,
    paired_ratio,
    peer_args,
    print_summary,
    report_worker,
    representative,
    run_all,
    time_flax_peer,
    time_our_step,
    time_torch_peer,
    write_report,
    xla_memory,
)

RESULT_PREFIX = "T5_PEERS_RESULT "
# ours_scanned and ours_one_step_a_call are diagnostic rows (layers scanned; one step a call);
# ours_keep_freed and ours_small_pages are the allocator's A/Bs (keeping freed memory; no huge
# pages).
IMPLEMENTATIONS = ("ours", "ours_small_pages", "ours_keep_freed", "ours_one_step_a_call", "flax",
                   "torch", "ours_scanned")
TITLES = {
    "ours": "t5x_like (NNX, span corruption in step; the small preset's steps a call)",
    "ours_small_pages": "t5x_like, without huge pages (T5X_LIKE_HUGE_PAGES=0)",
    "ours_keep_freed": "t5x_like, keeping freed memory (T5X_LIKE_KEEP_FREED_MEMORY=1)",
    "ours_one_step_a_call": "t5x_like, train.steps_per_call=1 (diagnostic)",
    "ours_scanned": "t5x_like, layers scanned with remat dots, as large (diagnostic)",
    "flax": "transformers FlaxT5 + optax adamw (jit)",
    "torch": "transformers PyTorch T5 + torch AdamW",
}
SEED = 0
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.0  # our config's default; the peers' defaults (1e-4, 1e-2) differ
MODEL = dict(d_model=256, d_kv=64, num_heads=4, d_ff=1024, num_encoder_layers=4,
             num_decoder_layers=4, vocab_size=32128)
BATCH, INPUTS_LENGTH, TARGETS_LENGTH, RAW_LENGTH = 8, 512, 114, 568
TOKEN_RANGE = (2, 32000)  # synthetic ids: no pad (0) and no EOS (1)
TOKENS_PER_STEP = BATCH * (INPUTS_LENGTH + TARGETS_LENGTH)


# --------------------------------------------------------------------------- measuring


def synthetic_batch(shape: tuple[int, ...], salt: int):
    import numpy as np

    rng = np.random.default_rng([SEED, salt])
    return rng.integers(*TOKEN_RANGE, size=shape, dtype=np.int64).astype(np.int32)


# --------------------------------------------------------------------------- ours


def stub_missing_modules() -> list[str]:
    """Stand-ins, in this process only, for modules that fail to import but that the training
    step never calls; each one used is reported with the results.

    ``families/t5.py`` imports ``t5x_like.decoding`` for ``predict_batch`` only; ``train.py``
    imports ``clu.metric_writers`` (which needs ``tensorboard``) for its metrics log only.
    """
    import importlib
    import types

    stubbed = []
    for name in ("t5x_like.decoding", "clu.metric_writers"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            parent_name, _, child = name.rpartition(".")
            module = types.ModuleType(name)
            sys.modules[name] = module
            setattr(importlib.import_module(parent_name), child, module)
            stubbed.append(f"{name} failed to import ({type(e).__name__}: {e}); stubbed here, "
                           "unused by the train step")
    return stubbed


def our_overrides(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The ``small`` preset's overrides that give this benchmark's model, batch and optimizer."""
    return [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f"data.inputs_length={INPUTS_LENGTH}", f"data.batch_size={BATCH}",
        "optimizer.name=adamw", f"optimizer.learning_rate={LEARNING_RATE}",
        "optimizer.schedule=constant", "loss.z_loss=0.0", "model.dropout_rate=0.0", *extra]


def run_ours(args, extra_overrides: tuple[str, ...] = ()) -> dict:
    import jax
    import numpy as np

    workarounds = stub_missing_modules()
    from t5x_like import config as config_lib
    from t5x_like.experiment import build

    config = config_lib.load_config(str(ROOT / "configs/t5_span_corruption.py:small"),
                                    our_overrides(extra_overrides))
    tokens = synthetic_batch((BATCH, RAW_LENGTH), salt=1)
    rss_before = our_rss_baseline(config)

    exp = build(config)
    family = exp.family
    if family.raw_length != RAW_LENGTH or family.targets_length != TARGETS_LENGTH:
        raise RuntimeError(f"expected raw length {RAW_LENGTH} -> targets {TARGETS_LENGTH}, "
                           f"got {family.raw_length} -> {family.targets_length}")
    state = exp.init_state()
    batch = jax.device_put({"tokens": tokens}, exp.batch_sharding)
    timing, compiled = time_our_step(exp, state, batch, warmup=args.warmup, steps=args.steps,
                                     tokens_per_step=TOKENS_PER_STEP)

    # The objective alone: its share of the step.
    features = jax.jit(family.features)
    key = jax.random.key(SEED)
    out = features(batch, key)
    if out["inputs"].shape != (BATCH, INPUTS_LENGTH) or out["targets"].shape != (
            BATCH, TARGETS_LENGTH):
        raise RuntimeError(f"span corruption gave {jax.tree.map(np.shape, out)}")
    jax.block_until_ready(out)
    corruption = []
    for i in range(args.corruption_calls):
        k = jax.random.fold_in(key, i)
        start = time.perf_counter()
        jax.block_until_ready(features(batch, k))
        corruption.append(time.perf_counter() - start)
    corruption_ms = 1000 * statistics.median(corruption)
    return {
        **timing,
        "num_params": int(family.num_params),
        **memory_growth(rss_before),
        "xla_memory_bytes": xla_memory(compiled),
        "span_corruption_ms_median": corruption_ms,
        "span_corruption_share": corruption_ms / timing["step_ms_median"],
        "timed_via": "step.lower(state, batch).compile() of make_train_step(exp); state donated",
        "workarounds": workarounds,
    }


# --------------------------------------------------------------------------- transformers, Flax


def shim_jnp_clip() -> None:
    """transformers 4.x Flax T5 calls ``jnp.clip(x, a_max=...)``; jax 0.10 only has min/max."""
    import functools
    import inspect

    import jax.numpy as jnp

    if "a_max" in inspect.signature(jnp.clip).parameters:
        return
    clip = jnp.clip

    @functools.wraps(clip)
    def clip_with_a_min_a_max(arr=None, min=None, max=None, *, a_min=None, a_max=None):
        return clip(arr, a_min if min is None else min, a_max if max is None else max)

    jnp.clip = clip_with_a_min_a_max


def hf_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=MODEL["vocab_size"], d_model=MODEL["d_model"], d_kv=MODEL["d_kv"],
        d_ff=MODEL["d_ff"], num_layers=MODEL["num_encoder_layers"],
        num_decoder_layers=MODEL["num_decoder_layers"], num_heads=MODEL["num_heads"],
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def peer_batch() -> dict:
    return {"inputs": synthetic_batch((BATCH, INPUTS_LENGTH), salt=2),
            "targets": synthetic_batch((BATCH, TARGETS_LENGTH), salt=3)}


def run_flax(args) -> dict:
    shim_jnp_clip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from transformers import FlaxT5ForConditionalGeneration

    data = peer_batch()
    decoder_inputs = np.pad(data["targets"], ((0, 0), (1, 0)))[:, :-1]  # start token 0
    rss_before = current_rss_bytes()

    model = FlaxT5ForConditionalGeneration(hf_config(), seed=SEED, dtype=jnp.float32)

    def loss_fn(params, batch, dropout_rng):
        logits = model(input_ids=batch["inputs"], decoder_input_ids=batch["decoder_inputs"],
                       params=params, dropout_rng=dropout_rng, train=False).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    host_batch = {"inputs": data["inputs"], "decoder_inputs": decoder_inputs,
                  "targets": data["targets"]}
    result = time_flax_peer(loss_fn, model.params, host_batch, jax.random.key(SEED),
                            rss_before=rss_before, learning_rate=LEARNING_RATE,
                            weight_decay=WEIGHT_DECAY, warmup=args.warmup, steps=args.steps,
                            tokens_per_step=TOKENS_PER_STEP)
    return {
        **result,
        "timed_via": "jax.jit(train_step, donate params + opt_state).lower().compile(); "
                     "model(..., train=False) (dropout is 0 either way); jnp.clip shimmed",
    }


# --------------------------------------------------------------------------- transformers, PyTorch


def run_torch(args) -> dict:
    from transformers import T5ForConditionalGeneration

    data = peer_batch()  # the model shifts the labels right itself
    result = time_torch_peer(lambda: T5ForConditionalGeneration(hf_config()), data["inputs"],
                             data["targets"], seed=SEED, learning_rate=LEARNING_RATE,
                             weight_decay=WEIGHT_DECAY, warmup=args.warmup, steps=args.steps,
                             tokens_per_step=TOKENS_PER_STEP)
    return {
        **result,
        "timed_via": "eager; model.train(); loss from labels; torch.optim.AdamW (default foreach)",
    }


RUNNERS = {
    "ours": run_ours,
    "flax": run_flax,
    "torch": run_torch,
    "ours_scanned": lambda args: run_ours(args, ("model.scan_layers=True",
                                                 "model.remat_policy=dots")),
    "ours_keep_freed": run_ours,  # report_worker applies host_memory.keep_freed_memory()
    "ours_small_pages": run_ours,  # common.worker_environment leaves glibc's tunables alone
    "ours_one_step_a_call": lambda args: run_ours(args, ("train.steps_per_call=1",)),
}


# --------------------------------------------------------------------------- driver


def main(argv=None) -> None:
    args = peer_args(argv, description=__doc__.split("\n")[0], implementations=IMPLEMENTATIONS,
                     default_out=ROOT / "benchmarks/results.json",
                     extra={"--corruption-calls": dict(
                         type=int, default=50,
                         help="calls of the span corruption alone (median reported)")})
    if args.worker:
        report_worker(RUNNERS[args.worker], args, RESULT_PREFIX)
        return

    env = environment()
    print(f"{env['nproc']} x {env['cpu']}, load average {env['loadavg_at_start'][0]:.2f}; "
          f"{BATCH} x ({INPUTS_LENGTH} + {TARGETS_LENGTH}) = {TOKENS_PER_STEP} tokens/step, "
          f"{args.warmup} warm-up + {args.steps} timed steps (ours: in whole calls of "
          "train.steps_per_call steps)", flush=True)
    results = run_all(Path(__file__).resolve(), args.only or IMPLEMENTATIONS,
                      ["--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--corruption-calls", str(args.corruption_calls)],
                      prefix=RESULT_PREFIX, quiet_wait=args.quiet_wait, timeout=args.timeout,
                      repeats=args.repeats)
    summary = print_summary(results, TITLES, ("ours", "ours_small_pages", "ours_keep_freed",
                                              "ours_one_step_a_call", "ours_scanned"))
    for label, (a, b) in {"ours_keep_freed / ours (allocator A/B)": ("ours_keep_freed", "ours"),
                          "ours_small_pages / ours (huge pages A/B)": ("ours_small_pages",
                                                                       "ours"),
                          "ours / ours_one_step_a_call (steps a call)": (
                              "ours", "ours_one_step_a_call"),
                          "ours / ours_scanned (scan overhead)": ("ours", "ours_scanned")}.items():
        ratio = paired_ratio(results, a, b)
        if ratio:
            summary[label] = ratio
            print(f"{label}: {ratio['median']:.3f}x median, "
                  f"{ratio['min']:.3f}-{ratio['max']:.3f}x")
    for name in ("ours", "ours_scanned"):
        r = representative(results[name]) if results.get(name) else {}
        if r.get("ok"):
            print(f"span corruption alone: {r['span_corruption_ms_median']:.2f} ms = "
                  f"{100 * r['span_corruption_share']:.2f}% of the {name} step")
    config = {**MODEL, "batch": BATCH, "inputs_length": INPUTS_LENGTH,
              "targets_length": TARGETS_LENGTH, "raw_length_ours": RAW_LENGTH,
              "tokens_per_step": TOKENS_PER_STEP, "dtype": "float32",
              "optimizer": f"AdamW lr {LEARNING_RATE}", "dropout": 0.0,
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              "interleaved_repetitions": args.repeats}
    write_report(args.out, env=env, config=config, results=results, summary=summary)


if __name__ == "__main__":
    main()
