"""The README's protocol-2 figures are the committed reports' (results/ablations/<task>/report.json):
every key-comparison row and every arm's mean ± std, so the prose cannot drift from the files."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
COMPARISON = re.compile(
    r"^\| `(\w+)` vs `(\w+)` \| (\d+) \| ([+-]\d+\.\d\d) \| \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\] \| (\d\.\d{3}) \| "
    r"\*\*(\w+)\*\*(.*?) \|$",
    re.M,
)
ARM = re.compile(r"^\| `(\w+)` \| [^|]+ \| [\d,]+ \| (\d\.\d{4}) ± (\d\.\d{4}) \((\d+)\) \|$", re.M)


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n### ", start + 1)
    return README[start:end]


def report(task: str) -> dict:
    return json.loads((REPO / "results" / "ablations" / task / "report.json").read_text())


@pytest.mark.parametrize(
    "task,title,comparisons,arms",
    [("mrpc", "### MRPC under protocol 2", 4, 6), ("stsb", "### STS-B under protocol 2", 2, 3)],
)
def test_readme_figures_are_the_committed_report_s(task, title, comparisons, arms):
    text, rep = section(title), report(task)
    pairs = {(c["variant"], c["against"]): c for c in rep["comparisons"]}
    rows = COMPARISON.findall(text)
    assert len(rows) >= comparisons, "the key comparisons' table is missing"
    for a, b, n, diff, lo, hi, p, word, rest in rows:
        c = pairs[(a, b)]
        assert int(n) == c["n"]
        assert (diff, lo, hi) == tuple(f"{100 * x:+.2f}" for x in (c["diff"], *c["ci"]))
        assert p == f"{c['p']:.3f}"
        assert c["verdict"].startswith(word)
        if c["more_seeds"] is not None and c["decision"] == "undecided":
            assert f"about {c['more_seeds']} more seed" in rest
    means = {r["variant"]: r for r in rep["rows"]}
    found = ARM.findall(text)
    assert len(found) >= arms, "the arms' table is missing"
    for arm, mean, std, n in found:
        r = means[arm]
        assert (mean, std, int(n)) == (f"{r['mean']:.4f}", f"{r['std']:.4f}", r["n"])


@pytest.mark.parametrize(
    "root,task,plan",
    [
        ("results/ablations", "mrpc", "mrpc"),
        ("results/ablations", "stsb", "stsb"),
        ("results/ablations/protocol1", "mrpc", None),
        ("results/ablations/protocol1", "rte", None),
    ],
)
def test_committed_reports_are_what_the_committed_results_give(tmp_path, root, task, plan):
    """`make ablation-report` on a plain clone rewrites each committed report.{md,json} byte for byte
    (a report left behind by a change of the report's format is caught here)."""
    import shutil

    from msplora.ablation.plan import load_plan
    from msplora.ablation.table import DEFAULT_MARGIN
    from msplora.ablation.table import report as write_report

    src = REPO / root / task
    shutil.copytree(src, tmp_path / task, ignore=shutil.ignore_patterns("runs", "report.*", "*.claim"))
    p = load_plan(plan) if plan else None
    write_report(
        task, tmp_path, p.baseline if p else None, p.margin if p else DEFAULT_MARGIN, list(p.compare) if p else []
    )
    for name in ("report.md", "report.json"):
        assert (tmp_path / task / name).read_bytes() == (src / name).read_bytes(), name
