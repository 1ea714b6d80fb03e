"""The report: collect the finished seeds of each variant; write a markdown table, JSON and a PNG.

    results/ablations/<task>/<name>/seed<k>.json -> results/ablations/<task>/report.{md,json,png}

Named ``table`` rather than ``report`` so that ``msplora.ablation.report`` stays the function.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from msplora.ablation.signature import same_run
from msplora.ablation.variants import RESULTS, AblationError
from msplora.io import atomic_write, write_json_atomic, write_text_atomic


def collect(task: str, root: Path = RESULTS, log=print) -> dict[str, list[dict]]:
    """Each variant's seed records that belong with its seed 0 (same settings and LR).

    A seed file left from an older grid or seed count (another LR, other settings) is named
    and left out, so a table never mixes runs.
    """
    found: dict[str, list[dict]] = {}
    for folder in sorted(p for p in (root / task).glob("*") if p.is_dir()):
        recs = []
        for path in sorted(folder.glob("seed*.json"), key=lambda p: (len(p.name), p.name)):
            try:
                recs.append((path, json.loads(path.read_text())))
            except json.JSONDecodeError:
                log(f"[report] {path}: unreadable, left out (rerun the variant to redo it)")
        if not recs:
            continue
        ref = recs[0][1]
        keep = []
        for path, rec in recs:
            if same_run(rec, ref.get("signature"), ref["lr"]):
                keep.append(rec)
            else:
                log(f"[report] {path}: made at another LR or with other settings than {recs[0][0].name}, left out")
        found[folder.name] = keep
    return found


def _fmt_lr(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def summarise(found: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, recs in found.items():
        vals = [r["test"] for r in recs]  # in seed order (collect sorts the files)
        lrs = sorted({r["lr"] for r in recs})
        lora = recs[0].get("lora_r8_adapter_params")
        swept = sorted(float(k) for k in recs[0].get("lr_sweep", {}))
        edge = ""
        if len(swept) > 1 and len(lrs) == 1:  # a chosen LR on the sweep's edge may not be the best one
            edge = "top" if math.isclose(lrs[0], swept[-1]) else "bottom" if math.isclose(lrs[0], swept[0]) else ""
        rows.append(
            {
                "variant": name,
                "levels": recs[0].get("levels", "?"),
                "lr": ", ".join(_fmt_lr(x) for x in lrs),
                "swept": [_fmt_lr(x) for x in swept],
                "lr_edge": edge,
                "metric": recs[0]["metric"],
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "median": statistics.median(vals),
                "n": len(vals),
                "seeds": [r.get("seed") for r in recs],
                "values": vals,
                "adapter_params": recs[0]["adapter_params"],
                "vs_lora": recs[0]["adapter_params"] / lora if lora else math.nan,
            }
        )
    return sorted(rows, key=lambda r: (r["adapter_params"], r["variant"]))


def markdown(rows: list[dict], task: str) -> str:
    metric = rows[0]["metric"] if rows else "metric"
    lines = [
        f"Task `{task}`: dev-split {metric}, mean ± std (sample std) and median over seeds, at each variant's LR "
        "(chosen on a validation split carved from train). Params: trainable adapter parameters; "
        "vs LoRA: relative to LoRA r=8 on the same targets. LR chosen: ↑ / ↓ = the largest / smallest "
        "LR swept, so a better one may lie beyond.",
        "",
        f"| variant | levels | LR chosen | LRs swept | dev {metric} (mean ± std, n) | median "
        "| adapter params | vs LoRA r=8 |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        mark = {"top": " ↑", "bottom": " ↓"}.get(r.get("lr_edge", ""), "")
        swept = ", ".join(r.get("swept", [])) or "-"
        lines.append(
            f"| {r['variant']} | {r['levels']} | {r['lr']}{mark} | {swept} | {r['mean']:.4f} ± {r['std']:.4f} "
            f"({r['n']}) | {r['median']:.4f} | {r['adapter_params']:,} | {r['vs_lora']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Variants that land on the same point (same pyramid, e.g. group_size_2 = full on 6 layers)
    # share one label; in a column of points, labels alternate above and below.
    points: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        points.setdefault((r["adapter_params"], round(r["mean"], 6)), []).append(r)
    column_seen: dict[int, int] = {}
    for (x, _), group in sorted(points.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        r = group[0]
        lora_like = r["levels"].startswith("L") and " " not in r["levels"]
        ax.errorbar(
            x,
            r["mean"],
            yerr=r["std"],
            fmt="s" if lora_like else "o",
            color="tab:gray" if lora_like else "tab:blue",
            capsize=3,
        )
        below = column_seen.get(x, 0) % 2 == 1
        column_seen[x] = column_seen.get(x, 0) + 1
        ax.annotate(
            " = ".join(g["variant"] for g in group),
            (x, r["mean"]),
            textcoords="offset points",
            xytext=(6, -11) if below else (6, 4),
            fontsize=8,
        )
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.set_xlabel("trainable adapter parameters")
    ax.set_ylabel(f"dev {rows[0]['metric'] if rows else 'metric'} (mean ± std over seeds)")
    ax.set_title(f"MSPLoRA ablations: {task}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:  # mode=None: the mode open() gives, as the report always had
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True, mode=None)
    finally:
        plt.close(fig)


def report(task: str, root: Path = RESULTS) -> str:
    found = collect(task, root)
    if not found:
        raise AblationError(f"no results under {root / task}. Fix: run `make ablation NAME=full TASK={task}` first")
    rows = summarise(found)
    text = markdown(rows, task)
    out = root / task
    write_text_atomic(out / "report.md", text, mode=None)
    write_json_atomic(out / "report.json", {"task": task, "rows": rows})
    plot(rows, out / "report.png", task)
    return text
