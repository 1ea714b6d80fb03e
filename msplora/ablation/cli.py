"""The command line: ``msplora ablation run ...`` and ``msplora ablation report ...``.

Checks every argument before anything runs, then hands over to the runner and the report.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from msplora.ablation.runner import DEFAULT_EXTEND, EMBEDDED_STEPS, SELECTION_SEED, run_variant
from msplora.ablation.table import DEFAULT_MARGIN, report
from msplora.ablation.variants import DEFAULT_TASK, RESULTS, AblationError, is_embedded, variant_names, variant_path
from msplora.errors import ArgumentParser
from msplora.io import split_passthrough

DESCRIPTION = "Ablation suite: run the overlays in ``ablations/`` fairly, and tabulate what exists."


def main(argv: list[str] | None = None) -> None:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="msplora ablation", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser(
        "run", help="run variants (LR sweep on the selection seed(s), then every reported seed at the chosen LR)"
    )
    r.add_argument("names", nargs="*", metavar="NAME", help="variants (file stems in ablations/)")
    r.add_argument("--all", action="store_true", help="every variant in ablations/")
    r.add_argument("--task", default=DEFAULT_TASK, help="task name (results folder; checked against the config)")
    r.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    r.add_argument(
        "--lrs",
        default=None,
        help='adapter LRs to sweep, e.g. "5e-4 1e-3 2e-3" (default: 1e-3 2e-3 4e-3 on the embedded '
        "task, else config lr x 0.5/1/2)",
    )
    r.add_argument(
        "--config",
        default=None,
        help="task config composed after configs/base.yaml "
        "(default: configs/demo.yaml for sentiment, else configs/<task>.yaml)",
    )
    r.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps per run (default {EMBEDDED_STEPS} on the embedded task, else the config's epochs)",
    )
    r.add_argument(
        "--extend",
        type=int,
        default=DEFAULT_EXTEND,
        help="when the best LR is the grid's largest or smallest, try up to this many more LRs outwards "
        f"(same geometric step), stopping once the best is inside (default {DEFAULT_EXTEND}; 0: the grid only)",
    )
    r.add_argument(
        "--selection-seeds",
        type=int,
        default=1,
        help=f"seeds that choose the LR ({SELECTION_SEED}, {SELECTION_SEED + 1}, ...: never reported; the mean "
        "validation value over them picks the LR; default 1)",
    )
    r.add_argument("--root", type=Path, default=RESULTS, help="results root")
    rp = sub.add_parser("report", help="markdown table, paired comparisons with verdicts, and a PNG")
    rp.add_argument("--task", default=DEFAULT_TASK)
    rp.add_argument("--root", type=Path, default=RESULTS)
    rp.add_argument(
        "--baseline",
        default=None,
        help="compare every variant against this one (default: lora_budget, else lora, when present)",
    )
    rp.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"equivalence margin in points of the metric (default {DEFAULT_MARGIN:g}: ±0.01)",
    )
    rp.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A:B",
        help="also compare A against B (repeatable), e.g. --compare pyramid_small:lora_r2",
    )
    pl = sub.add_parser(
        "plan",
        help="work on a plan (ablations/plans/NAME.yaml or a file) until its runs are done, then its report",
    )
    pl.add_argument("plan", metavar="PLAN", help="plan name (ablations/plans/) or path")
    pl.add_argument("--root", type=Path, default=RESULTS, help="results root (shared by every worker)")
    pl.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    pl.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores // workers)")
    pl.add_argument(
        "--hours",
        type=float,
        default=None,
        help="stop within this many hours: start no run that would end later (judged by the median "
        "finished run); the plan goes on where it left off next time",
    )
    pl.add_argument("--status", action="store_true", help="print what is done, running and left, and stop")
    pl.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    pl.add_argument("--worker-id", default=None, help=argparse.SUPPRESS)
    pl.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # --hours, as run_workers passes it
    a = p.parse_args(argv)

    if a.cmd == "plan":
        plan_command(a)
        return
    if a.cmd == "report":
        pairs = []
        for spec in a.compare:
            for one in spec.replace(",", " ").split():
                x, sep, y = one.partition(":")
                if not (sep and x and y):
                    raise AblationError(f"--compare {one!r}: not A:B. Fix: e.g. --compare pyramid_small:lora_r2")
                pairs.append((x, y))
        print(report(a.task, a.root, a.baseline, a.margin, pairs))
        print(f"wrote {a.root / a.task / 'report.md'} and {a.root / a.task / 'report.png'}")
        return
    if a.all == bool(a.names):
        raise AblationError(
            "give variant names or --all (not both, not neither). "
            f"Fix: e.g. `msplora ablation run full no_mid`; valid names: {', '.join(variant_names())}"
        )
    names = variant_names() if a.all else a.names
    for n in names:
        variant_path(n)  # every name checked before anything runs
    if a.steps is not None and a.steps < 1:
        # Lightning would train nothing and then fail to find a "best" checkpoint to test.
        raise AblationError(f"--steps {a.steps}: need at least 1 training step. Fix: e.g. --steps 100, or leave it out")
    if not 1 <= a.seeds <= SELECTION_SEED:
        raise AblationError(
            f"--seeds {a.seeds}: need 1 to {SELECTION_SEED} (seeds from {SELECTION_SEED} on choose the LR). Fix: e.g. --seeds 3"
        )
    if a.selection_seeds < 1:
        raise AblationError(f"--selection-seeds {a.selection_seeds}: need at least 1. Fix: e.g. --selection-seeds 1")
    if a.extend < 0:
        raise AblationError(f"--extend {a.extend}: need 0 or more. Fix: e.g. --extend 2")
    lrs = None
    if a.lrs:
        try:
            lrs = [float(x) for x in a.lrs.replace(",", " ").split()]
        except ValueError:
            raise AblationError(f'--lrs {a.lrs!r}: not numbers. Fix: e.g. --lrs "5e-4 1e-3 2e-3"') from None
        if not lrs or any(x <= 0 for x in lrs):
            raise AblationError(f'--lrs {a.lrs!r}: need positive values. Fix: e.g. --lrs "5e-4 1e-3 2e-3"')
    steps = a.steps if a.steps is not None else (EMBEDDED_STEPS if is_embedded(a.task, a.config) else None)
    t0 = time.perf_counter()
    for n in names:
        run_variant(
            n,
            a.task,
            a.seeds,
            lrs,
            a.config,
            steps,
            extra,
            root=a.root,
            extend=a.extend,
            selection_seeds=a.selection_seeds,
        )
        print(f"[suite] {n} finished; {time.perf_counter() - t0:.0f} s so far", flush=True)
    print(report(a.task, a.root))


def plan_command(a) -> None:
    from msplora.ablation.plan import load_plan, run_workers, status, work

    plan = load_plan(a.plan)  # checked whole before anything runs
    root = plan.results(a.root)
    if a.status:
        print(status(plan, root))
        return
    if a.workers < 1 or (a.threads is not None and a.threads < 1):
        raise AblationError(f"--workers {a.workers} / --threads {a.threads}: need 1 or more. Fix: e.g. --workers 2")
    if a.hours is not None and not a.hours > 0:
        raise AblationError(f"--hours {a.hours}: not a positive number of hours. Fix: e.g. --hours 2.5")
    deadline = a.deadline if a.deadline is not None else time.time() + a.hours * 3600 if a.hours else None
    if a.workers > 1:
        code = run_workers(a.plan, a.workers, a.root, a.threads, deadline)  # each finds the plan's folder
        if code:
            raise SystemExit(code)
    else:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        tag = f"[w{a.worker_id}] " if a.worker_id is not None else ""
        work(plan, root, log=lambda line: print(tag + line, flush=True), deadline=deadline)
    if not a.no_report:
        print(report(plan.task, root, plan.baseline, plan.margin, list(plan.compare)))
        print(status(plan, root))
