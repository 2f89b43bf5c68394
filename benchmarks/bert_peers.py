"""BERT masked-LM training throughput: ours against transformers' PyTorch and Flax BERT.

    make bench                                      # runs this after t5_peers.py
    .venv/bin/python benchmarks/bert_peers.py --steps 3 --warmup 1 --only ours   # a quick look

Same structure and measurements as ``t5_peers.py`` (its helpers live in ``common.py``): each
implementation in its own subprocess, the median of ``--steps`` synchronised training steps
(forward + backward + AdamW, float32, lr 1e-4, no weight decay) after ``--warmup`` steps,
peak RSS growth from just before the model is built, and XLA's ``memory_analysis()`` of the
JAX steps.

The config: hidden 256, 4 layers, 4 heads, FFN 1024, vocab 30522, 512 positions, length 128,
batch 32, dropout 0, MLM loss only (no NSP: ``BertForMaskedLM``). Tokens/s counts
``32 x 128`` tokens per step for all. The difference under test is where the vocabulary
projection runs:

- ``ours`` (``configs/bert_mlm_nsp.py:mini`` with MLM only) receives raw rows, masks 15% of
  them inside its jitted step (``objectives.masking``: 19 of 128 selected, 20 slots) and runs
  the MLM head (transform, LayerNorm, tied decoder) only at those 20 slots, as the original
  BERT code does (``masked_lm_positions``); ``ours_unrolled`` is the same with
  ``model.scan_layers=False`` (a diagnostic row).
- ``flax`` (``FlaxBertForMaskedLM`` + optax AdamW under ``jax.jit``) and ``torch``
  (``BertForMaskedLM`` + ``torch.optim.AdamW``) receive ready inputs with 20 [MASK]ed
  positions per row and labels there (-100 elsewhere) and, as transformers does, project every
  one of the 128 positions onto the vocabulary before the loss picks the 20.

Results: a table on stdout and ``benchmarks/results_bert.json``; the record is ``RESULTS.md``.
"""

from __future__ import annotations

from pathlib import Path

from common import (
    ROOT,
    current_rss_bytes,
    environment,
    memory_growth,
    our_rss_baseline,
    peer_args,
    print_summary,
    report_worker,
    run_all,
    time_flax_peer,
    time_our_step,
    time_torch_peer,
    write_report,
    xla_memory,
)

RESULT_PREFIX = "BERT_PEERS_RESULT "
IMPLEMENTATIONS = ("ours", "flax", "torch", "ours_unrolled")
TITLES = {
    "ours": "t5x_like (NNX, masking in step, MLM head at 20 slots)",
    "ours_unrolled": "t5x_like, model.scan_layers=False (diagnostic)",
    "flax": "transformers FlaxBertForMaskedLM + optax adamw (jit)",
    "torch": "transformers PyTorch BertForMaskedLM + torch AdamW",
}
SEED = 0
LEARNING_RATE = 1e-4
HIDDEN, LAYERS, HEADS, FFN, VOCAB, POSITIONS = 256, 4, 4, 1024, 30522, 512
BATCH, LENGTH, PREDICTIONS = 32, 128, 20
TOKEN_RANGE = (1000, 8000)  # ordinary ids in both vocabularies (ours: 8100; BERT's: 30522)
MASK_ID = 103  # BERT's [MASK]
TOKENS_PER_STEP = BATCH * LENGTH


def synthetic_ids(salt: int):
    import numpy as np

    rng = np.random.default_rng([SEED, salt])
    return rng.integers(*TOKEN_RANGE, size=(BATCH, LENGTH), dtype=np.int64).astype(np.int32)


# --------------------------------------------------------------------------- ours


def our_overrides(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The ``mini`` preset's overrides that give this benchmark's model, batch and optimizer."""
    return [
        f"model.vocab_size={VOCAB}", "model.hidden_dropout_rate=0.0",
        "model.attention_dropout_rate=0.0", "model.nsp_head=False", "model.pooler=False",
        "objective.layout='full_sentences'", f"objective.max_predictions={PREDICTIONS}",
        f"data.inputs_length={LENGTH}", f"data.batch_size={BATCH}", "optimizer.name=adamw",
        f"optimizer.learning_rate={LEARNING_RATE}", "optimizer.schedule=constant",
        "optimizer.weight_decay=0.0", "optimizer.grad_clip_norm=0.0", "loss.z_loss=0.0", *extra,
    ]


def our_batch() -> dict:
    """The synthetic batch ours trains on (host arrays)."""
    import numpy as np

    ids = synthetic_ids(salt=1)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
            "attention_mask": np.ones_like(ids)}


def run_ours(args, extra_overrides: tuple[str, ...] = ()) -> dict:
    import jax
    import numpy as np

    from t5x_like import config as config_lib
    from t5x_like.experiment import build

    config = config_lib.load_config(str(ROOT / "configs/bert_mlm_nsp.py:mini"),
                                    our_overrides(extra_overrides))
    m = config.model
    got = (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
           m.max_position_embeddings)
    if got != (HIDDEN, LAYERS, HEADS, FFN, POSITIONS):
        raise RuntimeError(f"the mini preset is {got}, not the benchmark's config")
    rss_before = our_rss_baseline(config)  # seqio + TensorFlow + vocabulary: imported before

    exp = build(config)
    state = exp.init_state()
    batch = jax.device_put(our_batch(), exp.batch_sharding)
    timing, compiled = time_our_step(exp, state, batch, warmup=args.warmup, steps=args.steps,
                                     tokens_per_step=TOKENS_PER_STEP)
    features = jax.jit(exp.family.features)(batch, jax.random.key(SEED))
    return {
        **timing,
        "num_params": int(exp.family.num_params),
        "mlm_slots": int(features["positions"].shape[1]),
        "selected_per_row": float(np.mean(np.sum(features["target_weights"], axis=1))),
        **memory_growth(rss_before),
        "xla_memory_bytes": xla_memory(compiled),
        "timed_via": "step.lower(state, batch).compile() of make_train_step(exp); state donated",
    }


# --------------------------------------------------------------------------- peers


def hf_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, intermediate_size=FFN,
                      max_position_embeddings=POSITIONS, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def peer_batch() -> dict:
    """Inputs with 20 [MASK]ed positions per row; labels there, -100 elsewhere."""
    import numpy as np

    ids = synthetic_ids(salt=1)
    rng = np.random.default_rng([SEED, 2])
    positions = np.stack([rng.choice(LENGTH, PREDICTIONS, replace=False) for _ in range(BATCH)])
    rows = np.arange(BATCH)[:, None]
    labels = np.full_like(ids, -100)
    labels[rows, positions] = ids[rows, positions]
    inputs = ids.copy()
    inputs[rows, positions] = MASK_ID
    return {"input_ids": inputs, "labels": labels}


def run_flax(args) -> dict:
    import jax.numpy as jnp
    import numpy as np
    import optax
    from transformers import FlaxBertForMaskedLM

    data = peer_batch()
    rss_before = current_rss_bytes()

    model = FlaxBertForMaskedLM(hf_config(), seed=SEED, dtype=jnp.float32)

    def loss_fn(params, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       params=params, train=False).logits
        weights = (batch["labels"] >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.maximum(batch["labels"], 0))
        return jnp.sum(ce * weights) / jnp.sum(weights)

    host_batch = {"input_ids": data["input_ids"], "labels": data["labels"],
                  "attention_mask": np.ones_like(data["input_ids"])}
    result = time_flax_peer(loss_fn, model.params, host_batch, rss_before=rss_before,
                            learning_rate=LEARNING_RATE, weight_decay=0.0, warmup=args.warmup,
                            steps=args.steps, tokens_per_step=TOKENS_PER_STEP)
    return {
        **result,
        "timed_via": "jax.jit(train_step, donate params + opt_state).lower().compile(); "
                     "model(..., train=False) (dropout is 0 either way)",
    }


def run_torch(args) -> dict:
    from transformers import BertForMaskedLM

    data = peer_batch()
    result = time_torch_peer(lambda: BertForMaskedLM(hf_config()), data["input_ids"],
                             data["labels"], seed=SEED, learning_rate=LEARNING_RATE,
                             weight_decay=0.0, warmup=args.warmup, steps=args.steps,
                             tokens_per_step=TOKENS_PER_STEP)
    return {
        **result,
        "timed_via": "eager; model.train(); loss from labels (-100 ignored); torch AdamW",
    }


RUNNERS = {
    "ours": run_ours,
    "flax": run_flax,
    "torch": run_torch,
    "ours_unrolled": lambda args: run_ours(args, ("model.scan_layers=False",)),
}


# --------------------------------------------------------------------------- driver


def main(argv=None) -> None:
    args = peer_args(argv, description=__doc__.split("\n")[0], implementations=IMPLEMENTATIONS,
                     default_out=ROOT / "benchmarks/results_bert.json")
    if args.worker:
        report_worker(RUNNERS[args.worker], args, RESULT_PREFIX)
        return

    env = environment()
    print(f"{env['nproc']} x {env['cpu']}, load average {env['loadavg_at_start'][0]:.2f}; "
          f"{BATCH} x {LENGTH} = {TOKENS_PER_STEP} tokens/step, {args.warmup} warm-up + "
          f"{args.steps} timed steps", flush=True)
    results = run_all(Path(__file__).resolve(), args.only or IMPLEMENTATIONS,
                      ["--steps", str(args.steps), "--warmup", str(args.warmup)],
                      prefix=RESULT_PREFIX, quiet_wait=args.quiet_wait, timeout=args.timeout,
                      repeats=args.repeats)
    summary = print_summary(results, TITLES, ("ours", "ours_unrolled"))
    config = {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "ffn": FFN, "vocab": VOCAB,
              "length": LENGTH, "batch": BATCH, "mlm_slots_ours": PREDICTIONS,
              "masked_positions_peers": PREDICTIONS, "tokens_per_step": TOKENS_PER_STEP,
              "dtype": "float32", "optimizer": f"AdamW lr {LEARNING_RATE}", "dropout": 0.0,
              "warmup_steps": args.warmup, "timed_steps": args.steps,
              "interleaved_repetitions": args.repeats}
    write_report(args.out, env=env, config=config, results=results, summary=summary)


if __name__ == "__main__":
    main()
