"""What the peer benchmarks share: timing synchronised steps, memory, machine load, the
subprocess per implementation, the environment record and the results table.

``t5_peers.py`` and ``bert_peers.py`` each define their implementations and call these; every
implementation runs in its own process (``run_worker``), which prints one JSON line prefixed by
the script's result prefix.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
QUIET_SHARE = 0.10  # a step counts as quiet when other processes took under 10% of the cores


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy, CPU seconds this process used) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields[:8]) - idle) / ticks, usage.ru_utime + usage.ru_stime


def time_steps(run_step, *, warmup: int, steps: int, tokens_per_step: int) -> dict:
    """Calls ``run_step()`` (which must block until its step is done) warmup + steps times.

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
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
        machine_after, ours_after = busy_cpu_seconds()
        others = (machine_after - machine) - (ours_after - ours)
        shares.append(max(others, 0.0) / (cores * times[-1]))
        machine, ours = machine_after, ours_after
    loop_s = sum(times)
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
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
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


def format_table(results: dict, titles: dict[str, str]) -> str:
    rows = [("implementation", "step ms (median)", "tokens/s", "peak RSS delta MiB",
             "XLA arg+out+temp MiB (temp)", "others' CPU")]
    for name, r in results.items():
        if not r.get("ok"):
            rows.append((f"{name}: {titles[name]}", "FAILED", "-", "-", "-", "-"))
            continue
        xla = r.get("xla_memory_bytes")
        xla_text = (f"{xla['argument_output_temp'] / MB:.0f} ({xla['temp'] / MB:.0f})"
                    if xla else "n/a")
        rows.append((f"{name}: {titles[name]}", f"{r['step_ms_median']:.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_delta_mb']:.0f}", xla_text,
                     f"{100 * r['other_processes_cpu_share']:.0f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratios(results: dict, ours: tuple[str, ...]) -> dict:
    """Each of ``ours`` against the faster of the peers 'flax' and 'torch'; flax / torch."""
    speed = {n: r["tokens_per_s"] for n, r in results.items() if r.get("ok")}
    out = {}
    peers = {n: s for n, s in speed.items() if n in ("flax", "torch")}
    if peers:
        fastest = max(peers, key=peers.get)
        for name in ours:
            if name in speed:
                out[f"{name} / {fastest} (faster peer)"] = speed[name] / peers[fastest]
    if "flax" in speed and "torch" in speed:
        out["flax / torch"] = speed["flax"] / speed["torch"]
    return out
