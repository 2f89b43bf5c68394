"""``t5x-like report``: Markdown + PNG plots for toy runs written by the real train.MetricsLog."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from t5x_like import cli
from t5x_like.errors import UserError
from t5x_like.evaluation import report
from t5x_like.train import MetricsLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _toy_run(workdir: Path, rate: float, eval_json: dict | None) -> dict:
    """A run whose train loss decays at ``rate``; eval every 4 steps; returns what was logged."""
    workdir.mkdir(parents=True)
    log = MetricsLog(workdir)
    logged = {"train": [], "eval": []}
    for step in range(1, 21):
        loss = 5.0 * np.exp(-rate * step) + 1.0
        log.write(step, {"train/loss": loss, "train/accuracy": 1 - loss / 6,
                         "learning_rate": 1e-3})
        logged["train"].append(loss)
        if step % 4 == 0:
            eval_loss = loss + 0.3 + 0.5 * (step == 20)  # the last eval is worse
            log.write(step, {"eval/loss": eval_loss, "eval/accuracy": 1 - eval_loss / 6})
            logged["eval"].append(eval_loss)
    log.close()
    (workdir / "config.json").write_text(json.dumps({"seed": 0}))  # not an eval report
    if eval_json:
        (workdir / "eval_glue.json").write_text(json.dumps(eval_json))
    return logged


def _images(markdown: str, base: Path) -> list[Path]:
    return [base / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)]


def test_report_for_two_runs_side_by_side(tmp_path):
    a = _toy_run(tmp_path / "span_corruption", 0.3,
                 {"step": 20, "accuracy": 81.5, "f1": 77.25, "task": "glue_mrpc"})
    b = _toy_run(tmp_path / "prefix_lm", 0.1, {"step": 20, "accuracy": 74.0})
    with open(tmp_path / "prefix_lm" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train/lo')  # a half-written last line of a killed run
    out = tmp_path / "out" / "report.md"
    assert cli.main(["report", str(tmp_path / "span_corruption"), str(tmp_path / "prefix_lm"),
                     "--out", str(out), "--title", "Objectives"]) == 0
    text = out.read_text()
    assert text.startswith("# Objectives")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "|---" not in line}
    for name, logged in (("span_corruption", a), ("prefix_lm", b)):
        steps, last_train, best_eval, last_eval = rows[name]
        assert steps == "20"
        assert float(last_train) == pytest.approx(logged["train"][-1], rel=1e-3)
        assert float(best_eval) == pytest.approx(min(logged["eval"]), rel=1e-3)
        assert float(last_eval) == pytest.approx(logged["eval"][-1], rel=1e-3)
        assert best_eval != last_eval  # the last eval was made worse on purpose
    assert rows["accuracy"] == ["81.5", "74"]
    assert rows["f1"] == ["77.25", "–"]  # prefix_lm has no F1
    assert "task" not in rows and "seed" not in rows  # strings and config.json are not metrics
    images = _images(text, out.parent)
    names = {p.name for p in images}
    assert {"curve_loss.png", "curve_accuracy.png", "curve_learning_rate.png",
            "eval_metrics.png"} <= names
    for png in images:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    import matplotlib.image

    pixels = matplotlib.image.imread(images[0])
    assert pixels.shape[0] > 100 and pixels.std() > 0.01  # not a blank canvas


def test_single_run_with_only_curves_and_loading(tmp_path):
    _toy_run(tmp_path / "one", 0.2, None)
    run = report.load_run(tmp_path / "one")
    steps, values = run.series("eval/loss")
    assert steps == [4, 8, 12, 16, 20] and len(values) == 5
    assert run.evals == {}
    out = report.write_report([tmp_path / "one"], tmp_path / "r.md")
    text = out.read_text()
    assert "## Eval metrics" not in text and "## Curves" in text
    assert all(p.is_file() for p in _images(text, tmp_path))


def test_eval_only_run_and_errors(tmp_path):
    (tmp_path / "ev" / "eval").mkdir(parents=True)
    (tmp_path / "ev" / "eval" / "squad.json").write_text(json.dumps({"em": 80.1, "f1": 88.0}))
    run = report.load_run(tmp_path / "ev")
    assert run.evals == {"eval/squad.json": {"em": 80.1, "f1": 88.0}}
    out = report.write_report([tmp_path / "ev"], tmp_path / "ev.md")
    assert "| em | 80.1 |" in out.read_text()
    # what `t5x-like eval --task --json` writes: metrics nested per task
    (tmp_path / "ev" / "tasks.json").write_text(json.dumps(
        {"step": 7, "mode": "decode", "metrics": {"glue_cola": {"matthews_corrcoef": 41.5}}}))
    assert report.load_run(tmp_path / "ev").evals["tasks.json"] == {
        "step": 7.0, "metrics/glue_cola/matthews_corrcoef": 41.5}
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        report.load_run(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        report.load_run(tmp_path / "missing")
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_loss_plot_and_summary_show_the_unigram_baseline(tmp_path, capsys, monkeypatch):
    """``t5x-like eval --json``'s unigram_loss appears in the summary table and as a dotted
    line at that height on the loss plot; the verb prints each PNG it linked."""
    import matplotlib.pyplot as plt

    _toy_run(tmp_path / "demo", 0.3, {"step": 20, "loss": 2.5, "unigram_loss": 4.75})
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    out = tmp_path / "demo" / "report.md"
    assert cli.main(["report", str(tmp_path / "demo"), "--out", str(out)]) == 0
    header, _, row = [line for line in out.read_text().splitlines() if line.startswith("|")][:3]
    assert header.split("|")[-2].strip() == "unigram baseline"
    assert float(row.split("|")[-2]) == 4.75
    printed = [Path(line.split("plot ", 1)[1]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("  plot ")]
    assert printed == _images(out.read_text(), out.parent) and len(printed) >= 2
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in printed)
    (loss_axes,) = [f.axes[0] for f in figures if f.axes and f.axes[0].get_title() == "loss"]
    dotted = [line for line in loss_axes.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and set(dotted[0].get_ydata()) == {4.75}
    (accuracy_axes,) = [f.axes[0] for f in figures if f.axes and
                        f.axes[0].get_title() == "accuracy"]
    assert not [line for line in accuracy_axes.get_lines() if line.get_linestyle() == ":"]
