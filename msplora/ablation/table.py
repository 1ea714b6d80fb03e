"""The report: collect the finished seeds of each variant; write a markdown table, the paired
comparisons with their verdicts, JSON and a PNG.

    results/ablations/<task>/<name>/seed<k>.json -> results/ablations/<task>/report.{md,json,png}

Named ``table`` rather than ``report`` so that ``msplora.ablation.report`` stays the function.
"""

from __future__ import annotations

import collections
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
                "protocol": recs[0].get("protocol", 1),
                "head_lr": sorted({r.get("head_lr") for r in recs if r.get("head_lr") is not None}),
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
                "devices": [(r.get("machine") or {}).get("device") for r in recs],
            }
        )
    return sorted(rows, key=lambda r: (r["adapter_params"], r["variant"]))


def _protocol_note(rows: list[dict]) -> str:
    heads = sorted({h for r in rows for h in r.get("head_lr", [])})
    protocols = sorted({r.get("protocol", 1) for r in rows})
    note = ""
    if protocols == [2]:
        note += " Protocol 2: LR chosen on selection seeds (1000+), reported seeds 0..n-1 are other runs."
    elif protocols:
        note += f" Protocol(s) {', '.join(map(str, protocols))} (1: seed 0 also chose the LR, head LR tied to it)."
    if len(heads) == 1:
        note += f" Head LR {heads[0]:g} for every variant."
    elif heads:
        note += f" Head LRs differ between variants: {', '.join(f'{h:g}' for h in heads)}."
    return note + _devices_note(rows)


def _devices_note(rows: list[dict]) -> str:
    """Which devices made the runs, when not one throughout (same runs by signature, other numerics)."""
    counts = collections.Counter(d for r in rows for d in r.get("devices", []))
    if len(counts) <= 1:
        return ""  # one device throughout, or none recorded
    parts = [f"{d} ({n})" for d, n in sorted((d, n) for d, n in counts.items() if d is not None)]
    if None in counts:
        parts.append(f"not recorded ({counts[None]})")
    return f" Devices of the runs: {', '.join(parts)}."


def markdown(rows: list[dict], task: str) -> str:
    metric = rows[0]["metric"] if rows else "metric"
    lines = [
        f"Task `{task}`: dev-split {metric}, mean ± std (sample std) and median over seeds, at each variant's LR "
        "(chosen on a validation split carved from train). Params: trainable adapter parameters; "
        "vs LoRA: relative to LoRA r=8 on the same targets. LR chosen: ↑ / ↓ = the largest / smallest "
        "LR swept, so a better one may lie beyond." + _protocol_note(rows),
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


# -- paired comparisons (msplora.ablation.stats) --------------------------------------------------------
DEFAULT_BASELINES = ("lora_budget", "lora")  # the equal-budget LoRA when it ran, else LoRA r=8
DEFAULT_MARGIN = 1.0  # points (0.01 of the metric): "equivalent" means the CI lies inside ±1 point


def default_baseline(found: dict[str, list[dict]]) -> str | None:
    return next((b for b in DEFAULT_BASELINES if b in found), None)


def _dev_predictions(rec: dict):
    """(pred, label) of the run's dev split (its first test split), or None (a protocol-1 run)."""
    from msplora.training.predictions import decode

    test = (rec.get("predictions") or {}).get("test") or {}
    return decode(test[sorted(test)[0]]) if test else None


def comparisons(
    found: dict[str, list[dict]],
    baseline: str | None,
    margin: float = DEFAULT_MARGIN,
    pairs: list[tuple[str, str]] = (),
) -> list[dict]:
    """Each variant against ``baseline``, then each of ``pairs`` (A, B): A - B on the dev split,
    paired by seed index over the seeds both have, from the runs' stored predictions."""
    from msplora.ablation.stats import compare, describe

    wanted = [(v, baseline) for v in found if baseline is not None and v != baseline] + [
        p for p in pairs if p[0] != p[1]
    ]
    rows, seen = [], set()
    for a, b in wanted:
        if (a, b) in seen:
            continue
        seen.add((a, b))
        for name in (a, b):
            if name not in found:
                raise AblationError(
                    f"no results of {name!r} to compare. Fix: run it (make ablation NAME={name}) or compare "
                    f"among {', '.join(found)}"
                )
        by_seed = [{r["seed"]: r for r in found[x]} for x in (a, b)]
        seeds = sorted(set(by_seed[0]) & set(by_seed[1]))
        runs = [[_dev_predictions(by_seed[i][s]) for s in seeds] for i in (0, 1)]
        paired = [k for k, s in enumerate(seeds) if runs[0][k] is not None and runs[1][k] is not None]
        row = {"variant": a, "against": b, "metric": found[a][0]["metric"], "seeds": [seeds[k] for k in paired]}
        if not paired:
            rows.append(row | {"verdict": "no paired predictions (protocol-1 results: rerun under protocol 2)"})
            continue
        c = compare([runs[0][k] for k in paired], [runs[1][k] for k in paired], row["metric"], margin / 100)
        rows.append(
            row
            | {
                "n": c.n_seeds,
                "examples": c.n_examples,
                "diff": c.diff,
                "ci": [c.ci_low, c.ci_high],
                "p": c.p_value,
                "mde": c.mde,
                "margin": c.margin,
                "verdict": describe(c),
                "decision": c.verdict,
                "more_seeds": c.more_seeds,
                "seed_sd": c.seed_var**0.5,
                "example_se": c.example_var**0.5,
            }
        )
    return rows


def comparisons_markdown(rows: list[dict], margin: float) -> str:
    if not rows:
        return ""

    def pts(x: float) -> str:
        return f"{100 * x:+.2f}"

    lines = [
        "",
        f"Paired comparisons on the dev split, A - B in points (x100), seed k of A against seed k of B on the "
        f"same examples: mean difference, 95 % CI (t over seeds, plus the dev set's own noise from a paired "
        f"bootstrap over examples), p-value, the smallest difference detectable at 80 % power at this n, and "
        f"the verdict against a margin of ±{margin:g} fixed before the runs: better / worse (CI excludes 0), "
        f"equivalent (CI inside ±{margin:g}), else undecided.",
        "",
        "| A | B | seeds | A - B | 95 % CI | p | detectable | verdict |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if "diff" not in r:
            lines.append(f"| {r['variant']} | {r['against']} | 0 | | | | | {r['verdict']} |")
            continue
        lo, hi = r["ci"]
        ci = f"[{pts(lo)}, {pts(hi)}]" if lo > -1e9 else "-"
        p = f"{r['p']:.3f}" if r["p"] == r["p"] else "-"
        mde = f"{100 * r['mde']:.2f}" if r["mde"] < 1e9 else "-"
        lines.append(
            f"| {r['variant']} | {r['against']} | {r['n']} | {pts(r['diff'])} | {ci} | {p} | {mde} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def report(
    task: str,
    root: Path = RESULTS,
    baseline: str | None = None,
    margin: float = DEFAULT_MARGIN,
    pairs: list[tuple[str, str]] = (),
) -> str:
    """Write report.{md,json,png} for ``task``; ``baseline`` None = the equal-budget LoRA (or LoRA r=8)
    when present. Everything is checked before anything is written."""
    found = collect(task, root)
    if not found:
        raise AblationError(f"no results under {root / task}. Fix: run `make ablation NAME=full TASK={task}` first")
    if baseline is not None and baseline not in found:
        raise AblationError(f"--baseline {baseline}: no results of it for {task}. Fix: use one of {', '.join(found)}")
    if margin <= 0:
        raise AblationError(f"--margin {margin}: need a positive margin in points. Fix: e.g. --margin 1")
    rows = summarise(found)
    compared = comparisons(found, baseline or default_baseline(found), margin, pairs)
    text = markdown(rows, task) + comparisons_markdown(compared, margin)
    out = root / task
    write_text_atomic(out / "report.md", text, mode=None)
    write_json_atomic(out / "report.json", {"task": task, "rows": rows, "comparisons": compared, "margin": margin})
    plot(rows, out / "report.png", task)
    return text
