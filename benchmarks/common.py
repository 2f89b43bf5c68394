"""What the peer benchmarks share: timing synchronised steps, memory, machine load, the
subprocess per implementation, the environment record and the results table.

``t5_peers.py`` and ``bert_peers.py`` each define their implementations and call these; every
implementation runs in its own process (``run_worker``), which prints one JSON line prefixed by
the script's result prefix. The command line (``peer_args``), the driver loop (``run_all``,
``print_summary``, ``write_report``) and the timed training loops of ours and of the peers
(``time_our_step``, ``time_flax_peer``, ``time_torch_peer``) are the same in both scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
QUIET_SHARE = 0.10  # a step counts as quiet when other processes took under 10% of the cores


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_growth(rss_before: int) -> dict:
    """The result's memory fields: RSS just before the model was built, and how far the peak
    rose above it (weights, optimizer state, compilation and activations)."""
    return {"rss_before_model_mb": rss_before / MB,
            "peak_rss_delta_mb": (peak_rss_bytes() - rss_before) / MB}


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds this process used) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields[:8]) - idle) / ticks, usage.ru_utime + usage.ru_stime


def time_steps(run_step, *, warmup: int, steps: int, tokens_per_step: int,
               steps_per_call: int = 1) -> dict:
    """Calls ``run_step()`` (which must block until it is done) warmup + steps times; each
    call runs ``steps_per_call`` training steps, and a step's time is the call's / that.

    Also reports how busy the rest of the machine was during the timed steps: the CPU time
    other processes took, as a fraction of all cores (0 = we had the machine to ourselves).
    """
    start = time.perf_counter()
    run_step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        run_step()
    cores = len(os.sched_getaffinity(0))
    times, shares = [], []
    first_machine, first_ours = busy_cpu_seconds()
    machine, ours = first_machine, first_ours
    loop_s = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        call_s = time.perf_counter() - start
        loop_s += call_s
        times.append(call_s / steps_per_call)
        machine_after, ours_after = busy_cpu_seconds()
        others = (machine_after - machine) - (ours_after - ours)
        shares.append(max(others, 0.0) / (cores * call_s))
        machine, ours = machine_after, ours_after
    median = statistics.median(times)
    quiet = [t for t, share in zip(times, shares, strict=True) if share < QUIET_SHARE]
    return {
        "other_processes_cpu_share": max(
            (machine - first_machine) - (ours - first_ours), 0.0) / (cores * loop_s),
        "other_processes_cpu_share_per_step": shares,
        "step_ms_median_quiet_steps": 1000 * statistics.median(quiet) if quiet else None,
        "quiet_steps": len(quiet),
        "own_cpu_cores_used": (ours - first_ours) / loop_s,
        "first_step_s": first,
        "step_times_s": times,
        "step_ms_median": 1000 * median,
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
        "tokens_per_s": tokens_per_step / median,
    }


def xla_memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    out = {name: int(getattr(stats, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    out["argument_output_temp"] = out["argument"] + out["output"] + out["temp"]
    return out


def wait_for_quiet(budget_s: float, *, threshold: float = 0.15, window_s: float = 3.0) -> float:
    """Waits (up to ``budget_s``) until other processes use under ``threshold`` of the cores;
    returns the seconds waited. Other engineers' test suites share this machine."""
    cores = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    while True:
        before = busy_cpu_seconds()[0]
        time.sleep(window_s)
        busy = (busy_cpu_seconds()[0] - before) / (cores * window_s)
        waited = time.perf_counter() - start
        if busy < threshold or waited >= budget_s:
            return waited
        print(f"  machine {100 * busy:.0f}% busy with other work; waiting", flush=True)


def run_worker(script: Path, name: str, worker_args: list[str], *, prefix: str,
               timeout: float) -> dict:
    """Runs ``script --worker NAME ARGS`` in a fresh process; its last ``prefix`` line."""
    command = [sys.executable, str(script), "--worker", name, *worker_args]
    env = worker_environment(name)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"ok": False,
                "error": f"exit code {proc.returncode}, no result; stderr tail:\n{tail}"}
    result = json.loads(lines[-1][len(prefix):])
    result["wall_s"] = time.perf_counter() - start
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    return result


def worker_environment(name: str) -> dict[str, str]:
    """The environment a row runs in: ours rows as the ``t5x-like`` command runs (glibc advising
    huge pages for its large blocks, ``t5x_like/host_memory.py``), except ``*_small_pages``
    (the A/B without them); the peers as their users run them."""
    from t5x_like.host_memory import huge_pages_environment

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if name.startswith("ours") and not name.endswith("_small_pages"):
        env = huge_pages_environment(env) or env
    return env


def environment() -> dict:
    from importlib.metadata import version

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gib": round(mem_kb / (1 << 20), 1),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "optax", "torch",
                                        "transformers")},
        "loadavg_at_start": os.getloadavg(),
    }


def representative(runs: list[dict]) -> dict:
    """The run whose step time is the median of an implementation's repetitions (the lower
    middle one for an even count), with every repetition's median step time beside it;
    the first failure when none succeeded."""
    ok = sorted((r for r in runs if r.get("ok")), key=lambda r: r["step_ms_median"])
    if not ok:
        return runs[0]
    return {**ok[(len(ok) - 1) // 2],
            "repetitions_ok": len(ok), "repetitions": len(runs),
            "step_ms_median_per_repetition": [r["step_ms_median"] if r.get("ok") else None
                                              for r in runs],
            "peak_rss_delta_mb_max": max(r["peak_rss_delta_mb"] for r in ok)}


def format_table(results: dict[str, list[dict]], titles: dict[str, str]) -> str:
    rows = [("implementation", "step ms: median (min-max) of repetitions", "tokens/s",
             "peak RSS delta MiB (max)", "XLA arg+out+temp MiB (temp)", "others' CPU")]
    for name, runs in results.items():
        r = representative(runs)
        if not r.get("ok"):
            rows.append((f"{name}: {titles[name]}", "FAILED", "-", "-", "-", "-"))
            continue
        per = [t for t in r["step_ms_median_per_repetition"] if t is not None]
        xla = r.get("xla_memory_bytes")
        xla_text = (f"{xla['argument_output_temp'] / MB:.0f} ({xla['temp'] / MB:.0f})"
                    if xla else "n/a")
        others = max(x["other_processes_cpu_share"] for x in runs if x.get("ok"))
        rows.append((f"{name}: {titles[name]}",
                     f"{r['step_ms_median']:.0f} ({min(per):.0f}-{max(per):.0f}, n={len(per)})",
                     f"{r['tokens_per_s']:.0f}",
                     f"{r['peak_rss_delta_mb']:.0f} ({r['peak_rss_delta_mb_max']:.0f})", xla_text,
                     f"<= {100 * others:.0f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def paired_ratio(results: dict[str, list[dict]], a: str, b: str) -> dict | None:
    """a's tokens/s over b's, one ratio per interleaved repetition (both timed in the same
    round; a round where either failed is left out), as median, min and max."""
    def speeds(name: str) -> list[float | None]:
        return [r["tokens_per_s"] if r.get("ok") else None for r in results.get(name, [])]

    values = [x / y for x, y in zip(speeds(a), speeds(b), strict=False)
              if x is not None and y is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "per_repetition": values}


def ratios(results: dict[str, list[dict]], ours: tuple[str, ...]) -> dict:
    """Each of ``ours`` against the faster (by median) of the peers 'flax' and 'torch', and
    flax / torch, each as ``paired_ratio``."""
    medians = {n: representative(runs)["tokens_per_s"] for n, runs in results.items()
               if n in ("flax", "torch") and representative(runs).get("ok")}
    pairs = {}
    if medians:
        fastest = max(medians, key=medians.get)
        pairs.update({f"{name} / {fastest} (faster peer)": (name, fastest) for name in ours})
    pairs["flax / torch"] = ("flax", "torch")
    out = {label: paired_ratio(results, a, b) for label, (a, b) in pairs.items()}
    return {label: value for label, value in out.items() if value is not None}


# --------------------------------------------------------------------------- timed training loops


def our_rss_baseline(config) -> int:
    """RSS before our model is built: ``build()`` imports the seqio tasks (TensorFlow) and loads
    the default vocabulary (training it on first use), so both happen first, as the peers'
    imports do, and stay out of the memory the model is charged with."""
    import t5x_like.tasks  # noqa: F401
    from t5x_like.data.vocab import get_vocabulary

    get_vocabulary(config.data.vocab_path or None)
    return current_rss_bytes()


def time_our_step(exp, state, batch, *, warmup: int, steps: int,
                  tokens_per_step: int) -> tuple[dict, Any]:
    """Times our train step as ``t5x-like train`` runs it with ``exp``'s config
    (``t5x_like.bench.compile_trainer_call``: one step a call or ``train.steps_per_call``, the
    same batch each step), the state donated.

    With k steps a call, the warm-up and the timed steps are whole calls, at least
    ``warmup`` and ``steps`` steps and at least 2 and 4 calls, and each timed call's time / k
    is one step's. Returns the timing
    (``steps_per_call``, ``compile_s``, ``final_loss``) and the compiled executable.
    """
    import jax

    from t5x_like.bench import compile_trainer_call

    start = time.perf_counter()
    compiled, args, per_call = compile_trainer_call(exp, state, batch)
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_call():
        holder["state"], metrics = compiled(holder["state"], args)
        jax.block_until_ready((holder["state"], metrics))
        holder["loss"] = float(jax.numpy.ravel(metrics["loss"])[-1])

    calls = lambda n, least: max(-(-n // per_call), least)  # noqa: E731  (ceil, at least)
    timing = time_steps(run_call, warmup=calls(warmup, 2), steps=calls(steps, 4),
                        tokens_per_step=tokens_per_step, steps_per_call=per_call)
    return {**timing, "steps_per_call": per_call, "compile_s": compile_s,
            "final_loss": holder["loss"]}, compiled


def time_flax_peer(loss_fn: Callable, params, host_batch: dict, *extra_args, rss_before: int,
                   learning_rate: float, weight_decay: float, warmup: int, steps: int,
                   tokens_per_step: int) -> dict:
    """Times optax AdamW steps on ``loss_fn(params, batch, *extra_args)`` under ``jax.jit``
    (params and optimizer state donated, through the compiled executable as ours)."""
    import jax
    import optax

    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = tx.init(params)
    batch = jax.device_put(host_batch)

    def train_step(params, opt_state, batch, *extra):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, *extra)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, opt_state, batch, *extra_args).compile()
    compile_s = time.perf_counter() - start
    holder = {"params": params, "opt_state": opt_state}

    def run_step():
        holder["params"], holder["opt_state"], loss = compiled(
            holder["params"], holder["opt_state"], batch, *extra_args)
        jax.block_until_ready((holder["params"], holder["opt_state"], loss))
        holder["loss"] = float(loss)

    timing = time_steps(run_step, warmup=warmup, steps=steps, tokens_per_step=tokens_per_step)
    return {
        **timing,
        "compile_s": compile_s,
        "final_loss": holder["loss"],
        "num_params": int(sum(x.size for x in jax.tree.leaves(holder["params"]))),
        **memory_growth(rss_before),
        "xla_memory_bytes": xla_memory(compiled),
    }


def time_torch_peer(build_model: Callable, inputs, labels, *, seed: int, learning_rate: float,
                    weight_decay: float, warmup: int, steps: int, tokens_per_step: int) -> dict:
    """Times eager PyTorch steps (``model.train()``, loss from ``labels``, torch AdamW) on all
    the cores; ``build_model()`` runs after the memory baseline."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(seed)
    inputs = torch.from_numpy(inputs).long()
    labels = torch.from_numpy(labels).long()
    rss_before = current_rss_bytes()

    model = build_model()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate,
                                  weight_decay=weight_decay)
    holder = {}

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=inputs, labels=labels).loss  # shifts or ignores labels itself
        loss.backward()
        optimizer.step()
        holder["loss"] = loss.item()

    timing = time_steps(run_step, warmup=warmup, steps=steps, tokens_per_step=tokens_per_step)
    return {
        **timing,
        "final_loss": holder["loss"],
        "num_params": int(sum(p.numel() for p in model.parameters())),
        **memory_growth(rss_before),
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver


def peer_args(argv: Sequence[str] | None, *, description: str, implementations: Sequence[str],
              default_out: Path, extra: dict[str, dict] | None = None) -> argparse.Namespace:
    """Both scripts' command line; ``extra`` options (flag: add_argument keywords) are listed
    after ``--only``. ``--worker NAME`` (hidden) runs one implementation in this process."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    parser.add_argument("--only", choices=implementations, action="append",
                        help="run only this implementation (repeatable)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of every implementation (median reported)")
    for flag, options in (extra or {}).items():
        parser.add_argument(flag, **options)
    parser.add_argument("--timeout", type=int, default=400, help="seconds per implementation")
    parser.add_argument("--quiet-wait", type=float, default=45,
                        help="seconds to wait, per implementation, for other load to pass")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--worker", choices=implementations, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be >= 1")
    return args


def report_worker(runner: Callable[[argparse.Namespace], dict], args: argparse.Namespace,
                  prefix: str) -> None:
    """One implementation in this process; prints one JSON line (or the error) at the end, for
    ``run_worker`` in the driver to read.

    Every row runs as its users run it: ours as the ``t5x-like`` command does (huge pages from
    ``worker_environment``), rows named ``*_keep_freed`` also keeping freed memory
    (``T5X_LIKE_KEEP_FREED_MEMORY=1``, ``t5x_like/host_memory.py``: the allocator's A/B).
    """
    from t5x_like import host_memory

    kept = args.worker.endswith("_keep_freed") and host_memory.keep_freed_memory()
    huge_pages = host_memory.HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    try:
        result = {"ok": True, **runner(args), "keeps_freed_memory": kept,
                  "glibc_huge_pages": huge_pages}
    except Exception as e:  # reported in the table, not hidden
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    print(prefix + json.dumps(result), flush=True)


def run_all(script: Path, names: Sequence[str], worker_args: list[str], *, prefix: str,
            quiet_wait: float, timeout: float, repeats: int = 1) -> dict[str, list[dict]]:
    """Runs each implementation in its own process, each after waiting (up to ``quiet_wait``
    s) for a quiet machine, in ``repeats`` interleaved rounds (A B C, A B C, ...), so that a
    slow spell of a shared machine lands on every implementation rather than on one; prints a
    line per run. Returns each implementation's runs in round order."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names:
            print(f"running {name} (repetition {round_index + 1} of {repeats}) ...", flush=True)
            waited = wait_for_quiet(quiet_wait)
            r = run_worker(script, name, worker_args, prefix=prefix, timeout=timeout)
            r["waited_for_quiet_s"] = waited
            results[name].append(r)
            if r.get("ok"):
                print(f"  {r['step_ms_median']:.0f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
                      f"loss {r['final_loss']:.3f}, {r['wall_s']:.0f} s in all, other "
                      f"processes took {100 * r['other_processes_cpu_share']:.0f}% of the "
                      "cores", flush=True)
            else:
                print(f"  FAILED: {r['error']}", flush=True)
    return results


def print_summary(results: dict, titles: dict[str, str], ours: tuple[str, ...]) -> dict:
    """Prints the results table and the speed ratios; returns the ratios."""
    print()
    print(format_table(results, titles))
    summary = ratios(results, ours)
    for label, v in summary.items():
        print(f"{label}: {v['median']:.2f}x median, {v['min']:.2f}-{v['max']:.2f}x over "
              f"{len(v['per_repetition'])} interleaved repetitions")
    return summary


def write_report(out: Path, *, env: dict, config: dict, results: dict, summary: dict) -> None:
    """Writes the JSON record (command, environment, config, results, ratios) to ``out``."""
    report = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "environment": env,
        "config": config,
        "results": results,
        "ratios": summary,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
