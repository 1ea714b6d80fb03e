"""Ablation suite: run the overlays in ``ablations/`` fairly, and tabulate what exists.

    ablations/<name>.yaml ──┐
    configs/base.yaml ──────┼─> LR sweep on seed 0 (select on a validation split carved
    task config ────────────┘      from train) -> all seeds at the chosen LR
                                 -> dev-split metric from the best checkpoint
    results/ablations/<task>/<name>/seed<k>.json   (one per finished seed, written atomically)
    results/ablations/<task>/<name>/lr_sweep/lr<lr>.json
    results/ablations/<task>/report.{md,png}

Why a sweep: levels have different scales (alpha / r) and shared tensors gather gradient
from several layers, so one learning rate would favour some variants. Each variant gets its
own best LR from ``--lrs`` (default: 1e-3, 2e-3, 4e-3 on the embedded task, else the
config's lr x 0.5, 1, 2; the head LR keeps the config's head_lr / lr ratio), chosen on the
carved validation split; the dev split is only ever used for the reported number.

A result file exists only once its run has fully finished (fit + test), so a rerun skips
finished work and reruns an interrupted seed; a file written under other settings
(steps, extra overrides) does not count and is redone. A finished run at one LR counts for
any grid holding that LR, so widening ``--lrs`` runs only the new LRs (and the other seeds
again if the chosen LR moves).

Modules, one concern each: ``variants`` (the overlays, task configs and paths), ``recipe`` (what
one run is made of), ``signature`` (when a finished result counts), ``runner`` (fit + test, the
LR sweep, a variant's seeds), ``table`` (the report: markdown table, JSON, PNG) and ``cli`` (``main``).

Usage (see the Makefile)::

    python -m msplora.ablation run NAME [NAME ...] | --all [--task T] [--seeds N]
        [--lrs "a b c"] [--config C] [--steps S] [--root DIR] -- EXTRA_CLI_OVERRIDES
    python -m msplora.ablation report [--task T] [--root DIR]
"""

from msplora.ablation.cli import main
from msplora.ablation.recipe import VAL_FRACTION, Recipe, base_recipe, parse
from msplora.ablation.runner import (
    DEFAULT_EXTEND,
    EMBEDDED_LRS,
    EMBEDDED_STEPS,
    best_of,
    fit_and_test,
    lr_tag,
    next_lr,
    run_variant,
)
from msplora.ablation.signature import run_signature
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
    "RESULTS",
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
