"""``analyze`` (spectra.json -> figures + summary.md) and ``msplora analyze``, its command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msplora.analysis.files import find_spectra, load_spectra
from msplora.analysis.numerics import _level_spectra, effective_ranks, kl_difference, layer_kl, mean_adjacent_kl
from msplora.analysis.plots import _safe, plot_level_spectra, plot_matrix
from msplora.errors import ArgumentParser


def _summary_md(summary: dict) -> str:
    lines = [
        f"# Spectrum analysis of `{summary['run']}`",
        "",
        f"Epochs recorded: {summary['epochs']}; figures below use epoch {summary['epoch']}.",
        "",
        "## Effective rank per level (Roy & Vetterli; mean over cells, min-max)",
        "",
        "| level | kind | rank | cells | effective rank | min-max |",
        "|---|---|---|---|---|---|",
    ]
    ranks = {lv["name"]: lv["rank"] for lv in summary["levels"]}
    for level, kinds in summary["effective_rank"].items():
        for kind, cells in kinds.items():
            v = list(cells.values())
            lines.append(
                f"| {level} | {kind} | {ranks.get(level, '?')} | {len(v)} | {np.mean(v):.3f} | "
                f"{min(v):.3f}-{max(v):.3f} |"
            )
    lines += ["", "## Mean adjacent-layer KL of whole-layer spectra", ""]
    against = summary.get("against")
    if against:
        lines += [
            f"Against `{against['run']}`; difference > 0: MSPLoRA separates layers more.",
            "",
            "| kind | MSPLoRA | LoRA | difference | mean KL difference (all pairs) |",
            "|---|---|---|---|---|",
        ]
        for kind, v in summary["mean_adjacent_kl"].items():
            if kind in against["mean_adjacent_kl"]:
                lines.append(
                    f"| {kind} | {v:.4f} | {against['mean_adjacent_kl'][kind]:.4f} | "
                    f"{against['adjacent_difference'][kind]:+.4f} | {against['mean_difference'][kind]:+.4f} |"
                )
            else:
                lines.append(f"| {kind} | {v:.4f} | absent | | |")
    else:
        lines += ["| kind | mean adjacent KL |", "|---|---|"]
        lines += [f"| {kind} | {v:.4f} |" for kind, v in summary["mean_adjacent_kl"].items()]
    lines += ["", "## Figures", ""] + [f"* `{Path(p).name}`" for p in summary["plots"]]
    return "\n".join(lines) + "\n"


def analyze(run: str, against: str | None = None, out: str | None = None) -> dict:
    """Analyse a run's spectra.json: PNGs + summary.md into ``out`` (default ``<run>/analysis``).

    Args:
        run: run directory (the newest spectra.json under it is used) or a spectra.json path.
        against: a LoRA run (directory or spectra.json) to compare layer KL with.
        out: output directory.

    Returns:
        The summary as a dict (also printed, and written as summary.md).
    """
    path = find_spectra(run)
    doc = load_spectra(path)
    lora_path = find_spectra(against) if against is not None else None  # read both before writing anything
    lora_doc = load_spectra(lora_path) if lora_path is not None else None
    if lora_doc is not None:
        mine, theirs = layer_kl(doc["records"][-1]), layer_kl(lora_doc["records"][-1])
        for kind in sorted(mine.keys() & theirs.keys()):
            if mine[kind][0] != theirs[kind][0]:
                raise ValueError(
                    f"{kind}: layers {mine[kind][0]} vs {theirs[kind][0]} in {lora_path}. Fix: compare runs of one model"
                )
    out_dir = Path(out) if out else (Path(run) if Path(run).is_dir() else path.parent) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    last = doc["records"][-1]

    plots = [
        plot_level_spectra(doc, lv["name"], out_dir / f"spectrum_{_safe(lv['name'])}.png")
        for lv in doc["levels"]
        if lv["name"] in _level_spectra(last)
    ]
    kls = layer_kl(last)
    for kind, (ids, m) in kls.items():
        plots.append(
            plot_matrix(
                m, ids, f"KL between layer spectra\n{kind}, epoch {last['epoch']}", out_dir / f"kl_{_safe(kind)}.png"
            )
        )
    summary: dict[str, Any] = {
        "run": str(path),
        "epochs": [r["epoch"] for r in doc["records"]],
        "epoch": last["epoch"],
        "levels": doc["levels"],
        "effective_rank": effective_ranks(last),
        "mean_adjacent_kl": {kind: mean_adjacent_kl(m) for kind, (_, m) in kls.items()},
        "plots": [],
    }
    if lora_doc is not None:
        lora_last = lora_doc["records"][-1]
        lora_kls = layer_kl(lora_last)
        cmp: dict[str, Any] = {
            "run": str(lora_path),
            "mean_adjacent_kl": {},
            "adjacent_difference": {},
            "mean_difference": {},
        }
        for kind, (ids, m) in kls.items():
            if kind not in lora_kls:
                continue
            _, lora_m = lora_kls[kind]  # same layers: checked before anything was written
            diff = kl_difference(m, lora_m)
            cmp["mean_adjacent_kl"][kind] = mean_adjacent_kl(lora_m)
            cmp["adjacent_difference"][kind] = mean_adjacent_kl(m) - mean_adjacent_kl(lora_m)
            off = ~np.eye(len(ids), dtype=bool)
            cmp["mean_difference"][kind] = float(diff[off].mean()) if off.any() else 0.0
            plots.append(
                plot_matrix(
                    diff,
                    ids,
                    f"KL MSPLoRA - LoRA, {kind}\n(> 0: MSPLoRA layers more distinct)",
                    out_dir / f"kl_diff_{_safe(kind)}.png",
                    diverging=True,
                )
            )
        summary["against"] = cmp
    summary["plots"] = [str(p) for p in plots]
    text = _summary_md(summary)
    (out_dir / "summary.md").write_text(text)
    summary["summary_md"] = str(out_dir / "summary.md")
    print(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``msplora analyze RUN [--against LORA_RUN] [--out DIR]``."""
    parser = ArgumentParser(
        prog="msplora analyze",
        description="Spectra of a run's adapter updates (written by SpectrumRecorder): "
        "per-level singular values, layer-to-layer KL, and the difference against a LoRA run.",
    )
    parser.add_argument("run", metavar="RUN", help="run directory (searched for spectra.json) or a spectra.json path")
    parser.add_argument("--against", metavar="LORA_RUN", help="LoRA run to compare layer KL with")
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN/analysis)")
    args = parser.parse_args(argv)
    try:
        analyze(args.run, against=args.against, out=args.out)
    except (FileNotFoundError, ValueError) as e:  # "problem. Fix: ...": one line via msplora.errors
        raise SystemExit(f"msplora analyze: error: {e}") from None
