"""Ablation suite: run the overlays in ``ablations/`` fairly, and tabulate what exists.

    ablations/<name>.yaml ──┐
    configs/base.yaml ──────┼─> LR sweep on the selection seed(s) 1000.. (select on a validation
    task config ────────────┘      split carved from train) -> reported seeds 0..N-1 at the chosen LR
                                 -> dev-split metric and per-example predictions (best checkpoint)
    results/ablations/<task>/<name>/seed<k>.json   (one per finished seed, written atomically)
    results/ablations/<task>/<name>/lr_sweep/lr<lr>_seed<s>.json
    results/ablations/<task>/report.{md,json,png}  (table + paired comparisons with verdicts)

Why a sweep: levels have different scales (alpha / r) and shared tensors gather gradient
from several layers, so one learning rate would favour some variants. Each variant gets its
own best adapter LR from ``--lrs`` (default: 1e-3, 2e-3, 4e-3 on the embedded task, else the
config's lr x 0.5, 1, 2), chosen on the carved validation split by seeds that are never
reported; the head LR is the task's one value (the config's ``head_lr``) for every variant; the
dev split is only ever used for the reported numbers. The report compares variants paired (same
seed index, same examples: :mod:`msplora.ablation.stats`).

A result file exists only once its run has fully finished (fit + test), so a rerun skips
finished work and reruns an interrupted seed; a file written under other settings
(steps, extra overrides) does not count and is redone. A finished run at one LR counts for
any grid holding that LR, so widening ``--lrs`` runs only the new LRs (and the other seeds
again if the chosen LR moves).

Modules, one concern each: ``variants`` (the overlays, task configs and paths), ``recipe`` (what
one run is made of), ``signature`` (when a finished result counts), ``runner`` (fit + test, the
LR sweep, a variant's seeds), ``stats`` (paired comparisons and verdicts), ``table`` (the report:
markdown table, comparisons, JSON, PNG), ``plan`` (a comparison's runs written down before they
start, ``ablations/plans/``, worked on by any number of workers), ``claims`` (one worker per run
when workers share a results folder) and ``cli`` (``main``).

Usage (see the Makefile)::

    python -m msplora.ablation run NAME [NAME ...] | --all [--task T] [--seeds N]
        [--lrs "a b c"] [--config C] [--steps S] [--root DIR] -- EXTRA_CLI_OVERRIDES
    python -m msplora.ablation plan PLAN [--workers N] [--threads K] [--root DIR] [--status]
    python -m msplora.ablation report [--task T] [--root DIR] [--baseline V] [--margin POINTS]
        [--compare A:B ...]
"""

from msplora.ablation.cli import main
from msplora.ablation.recipe import VAL_FRACTION, Recipe, base_recipe, parse
from msplora.ablation.runner import (
    DEFAULT_EXTEND,
    EMBEDDED_LRS,
    EMBEDDED_STEPS,
    SELECTION_SEED,
    best_of,
    fit_and_test,
    lr_tag,
    next_lr,
    run_variant,
)
from msplora.ablation.signature import PROTOCOL, run_signature
from msplora.ablation.table import collect, markdown, plot, report, summarise
from msplora.ablation.variants import (
    ABLATIONS,
    CONFIGS,
    DEFAULT_TASK,
    REPO,
    RESULTS,
    AblationError,
    hypothesis,
    is_embedded,
    levels_label,
    task_config,
    variant_names,
    variant_path,
)

__all__ = [
    "ABLATIONS",
    "CONFIGS",
    "DEFAULT_EXTEND",
    "DEFAULT_TASK",
    "EMBEDDED_LRS",
    "EMBEDDED_STEPS",
    "REPO",
    "PROTOCOL",
    "RESULTS",
    "SELECTION_SEED",
    "VAL_FRACTION",
    "AblationError",
    "Recipe",
    "base_recipe",
    "best_of",
    "collect",
    "fit_and_test",
    "hypothesis",
    "is_embedded",
    "levels_label",
    "lr_tag",
    "main",
    "markdown",
    "next_lr",
    "parse",
    "plot",
    "report",
    "run_signature",
    "run_variant",
    "summarise",
    "task_config",
    "variant_names",
    "variant_path",
]
