"""The README quotes benchmarks/RESULTS.md, never a figure of its own: every speed-up ratio it
names is one RESULTS.md records, and the BERT figure it calls the latest is the last one
RESULTS.md's BERT section measured (it once quoted 2.26x after RESULTS.md had moved on)."""

from __future__ import annotations

import re

from conftest import ROOT

RATIO = re.compile(r"(?<![\w.])(\d+\.\d+)x\b")


def _section(markdown: str, title_start: str) -> str:
    """The text of the ``## `` section whose title starts with ``title_start``."""
    parts = re.split(r"^## ", markdown, flags=re.M)
    (body,) = [p for p in parts if p.startswith(title_start)]
    return body


def test_every_ratio_the_readme_quotes_is_in_results():
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    quoted = set(RATIO.findall(readme))
    assert quoted  # the README does quote ratios; the pattern still finds them
    assert quoted <= set(RATIO.findall(results)), sorted(quoted - set(RATIO.findall(results)))


def test_the_readmes_latest_bert_figure_is_the_last_one_measured():
    readme = " ".join((ROOT / "README.md").read_text().split())
    bert = " ".join(_section((ROOT / "benchmarks" / "RESULTS.md").read_text(),
                             "BERT MLM training throughput").split())
    # Bold "ours / PEER (... faster peer ...) N.NNx" headline ratios, in the order measured.
    measured = re.findall(r"\*\*ours / \w+ \([^)]*faster peer\):? (\d+\.\d+)x", bert)
    assert len(measured) >= 2, measured
    (latest,) = re.findall(r"BERT row's latest figure is (\d+\.\d+)x", readme)
    assert latest == measured[-1], (latest, measured)
