"""``t5x-like report RUN_DIR... --out report.md``: training curves and eval numbers, side by side.

For each run directory it reads ``metrics.jsonl`` (one JSON object per logged step, written by
``train.MetricsLog``: ``{"step", "train/loss", "eval/loss", ...}``) and every eval report
(``*.json`` files in the run directory or its ``eval/`` folder, other than ``config.json``,
holding numbers: what ``t5x-like eval --json`` writes). It writes a Markdown file with:

- a summary table (steps, last train loss, best and last validation loss per run, and the
  unigram baseline where an eval report holds one: ``t5x-like eval --json``'s
  ``unigram_loss``);
- one PNG per logged quantity (``loss``, ``accuracy``, ...) with every run's training curve
  solid and validation curve dashed on shared axes, so objectives compare at a glance, as in
  the T5 paper's study; the loss plot draws each run's unigram baseline as a dotted line;
- the eval reports as a table (runs x metrics) and a grouped bar chart.

Plots go next to the Markdown file, in ``<out stem>_plots/``, linked by relative paths.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from t5x_like.errors import UserError

SKIP_JSON = {"config.json"}


@dataclass
class Run:
    """One run: its name, logged rows (step order) and eval reports ({file: {metric: value}})."""

    name: str
    path: Path
    rows: list[dict] = field(default_factory=list)
    evals: dict[str, dict[str, float]] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key``, in step order, skipping rows without it."""
        pairs = [(r["step"], r[key]) for r in self.rows if _is_number(r.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _flat_numbers(data, prefix: str = "") -> dict[str, float]:
    """The numbers of a JSON object, nested keys joined by '/': ``t5x-like eval --task``
    writes ``{"metrics": {task: {metric: value}}}``, which becomes ``metrics/task/metric``."""
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, value in data.items():
        if _is_number(value):
            out[prefix + str(key)] = float(value)
        elif isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}/"))
    return out


def load_run(path: str | Path) -> Run:
    """Reads a run directory; a UserError when it holds neither metrics.jsonl nor eval JSON."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory {path} does not exist")
    run = Run(name=path.resolve().name, path=path)
    log = path / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a half-written last line of a killed run
                continue
            if isinstance(row, dict) and _is_number(row.get("step")):
                run.rows.append(row)
        run.rows.sort(key=lambda r: r["step"])
    for candidate in sorted([*path.glob("*.json"), *path.glob("eval/*.json")]):
        if candidate.name in SKIP_JSON:
            continue
        try:
            data = json.loads(candidate.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        numbers = _flat_numbers(data)
        if numbers:
            run.evals[str(candidate.relative_to(path))] = numbers
    if not run.rows and not run.evals:
        raise UserError(f"{path} holds no metrics.jsonl and no eval JSON report; "
                        "pass a workdir written by t5x-like train or eval --json")
    return run


def _quantities(runs: list[Run]) -> dict[str, list[str]]:
    """{quantity: [keys]}: "train/loss" and "eval/loss" share the "loss" plot."""
    groups: dict[str, list[str]] = {}
    for run in runs:
        for row in run.rows:
            for key, value in row.items():
                if key == "step" or not _is_number(value):
                    continue
                quantity = key.split("/", 1)[1] if "/" in key else key
                if key not in groups.setdefault(quantity, []):
                    groups[quantity].append(key)
    return groups


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "plot"


BASELINE = "unigram_loss"  # written by t5x-like eval: a model knowing only token frequencies


def plots_dir(out: str | Path) -> Path:
    """Where ``write_report(..., out)`` puts its PNGs."""
    out = Path(out)
    return out.parent / f"{out.stem}_plots"


def images(markdown: str | Path) -> list[Path]:
    """The PNGs a written report links to, in order (not stale files beside them)."""
    markdown = Path(markdown)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown.read_text())
    return [markdown.parent / link for link in links]


def _plot_curves(runs: list[Run], quantity: str, keys: list[str], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        for key in sorted(keys):
            steps, values = run.series(key)
            if not steps:
                continue
            style = "--" if key.startswith(("eval", "valid")) else "-"
            marker = "o" if len(steps) < 30 else None
            ax.plot(steps, values, style, color=colors[i % len(colors)], marker=marker,
                    markersize=3, label=f"{run.name}: {key}")
        baseline = _eval_value(run, BASELINE)
        if quantity == "loss" and baseline is not None:
            ax.axhline(baseline, linestyle=":", color=colors[i % len(colors)],
                       label=f"{run.name}: unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel(quantity)
    ax.set_title(quantity)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _plot_evals(runs: list[Run], metrics: list[str], out: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(1, len(runs)) / 2), 4))
    width = 0.8 / len(runs)
    x = np.arange(len(metrics))
    for i, run in enumerate(runs):
        values = [_eval_value(run, m) for m in metrics]
        ax.bar(x + i * width, [0 if v is None else v for v in values], width, label=run.name)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, metrics, rotation=30, ha="right", fontsize=8)
    ax.set_title("eval metrics")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _eval_value(run: Run, metric: str) -> float | None:
    """The metric from the run's latest eval report that has it (by report step, then name)."""
    reports = sorted(run.evals.items(), key=lambda kv: (kv[1].get("step", -1), kv[0]))
    values = [r[metric] for _, r in reports if metric in r]
    return values[-1] if values else None


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _summary_table(runs: list[Run]) -> list[str]:
    baselines = any(_eval_value(r, BASELINE) is not None for r in runs)
    lines = ["| run | steps | last train loss | best eval loss | last eval loss |"
             + (" unigram baseline |" if baselines else ""),
             "|---|---|---|---|---|" + ("---|" if baselines else "")]
    for run in runs:
        steps = run.rows[-1]["step"] if run.rows else None
        _, train = run.series("train/loss")
        _, evals = run.series("eval/loss")
        lines.append(f"| {run.name} | {_fmt(steps)} | {_fmt(train[-1] if train else None)} | "
                     f"{_fmt(min(evals) if evals else None)} | "
                     f"{_fmt(evals[-1] if evals else None)} |"
                     + (f" {_fmt(_eval_value(run, BASELINE))} |" if baselines else ""))
    return lines


def write_report(run_dirs: list[str | Path], out: str | Path, *,
                 title: str = "Training report") -> Path:
    """Writes the Markdown report and its PNGs; returns the Markdown path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    if not run_dirs:
        raise UserError("report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # two runs called "workdir" in different folders
        if names.count(run.name) > 1:
            run.name = f"{run.name}-{i + 1}"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = plots_dir(out)
    plots.mkdir(exist_ok=True)

    lines = [f"# {title}", "", "Runs: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    if any(r.rows for r in runs):
        lines += ["## Summary", "", *_summary_table(runs), "", "## Curves", "",
                  "Solid: training; dashed: validation; dotted: the unigram baseline.", ""]
        for quantity, keys in _quantities(runs).items():
            png = plots / f"curve_{_slug(quantity)}.png"
            _plot_curves(runs, quantity, keys, png)
            lines += [f"### {quantity}", "", f"![{quantity}]({png.relative_to(out.parent)})", ""]
    metrics = sorted({m for r in runs for e in r.evals.values() for m in e if m != "step"})
    if metrics:
        lines += ["## Eval metrics", "", "| metric | " + " | ".join(r.name for r in runs) + " |",
                  "|---" * (len(runs) + 1) + "|"]
        for m in metrics:
            lines.append(f"| {m} | " + " | ".join(_fmt(_eval_value(r, m)) for r in runs) + " |")
        png = plots / "eval_metrics.png"
        _plot_evals(runs, metrics, png)
        lines += ["", f"![eval metrics]({png.relative_to(out.parent)})", ""]
        sources = [f"- {r.name}: " + ", ".join(f"`{f}`" for f in r.evals) for r in runs
                   if r.evals]
        lines += ["Eval reports read:", "", *sources, ""]
    out.write_text("\n".join(lines))
    return out
