"""The runner: one fit + test per (LR, seed), the LR sweep on the selection seed(s), then every
reported seed at the chosen LR.

The protocol (README "Comparisons that decide"): the adapter LR of each variant is chosen on a
validation split carved from train, with seeds reserved for selection (``SELECTION_SEED`` and up);
the reported seeds 0..N-1 are other runs, so no reported number took part in choosing its LR.
The head LR is one value per task, the config's ``model.head_lr`` (its ``lr`` when unset), the
same for every variant and every swept LR. Every run keeps its per-example predictions.

A result file exists only once its run has fully finished (fit + test), so a rerun skips
finished work (see :mod:`msplora.ablation.signature`) and reruns an interrupted seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path

from msplora.ablation.claims import Busy, claim
from msplora.ablation.recipe import Recipe, base_recipe, parse
from msplora.ablation.signature import PROTOCOL, read_result, run_signature
from msplora.ablation.variants import (
    ABLATIONS,
    RESULTS,
    AblationError,
    hypothesis,
    is_embedded,
    levels_label,
    task_config,
    variant_path,
)
from msplora.io import write_json_atomic

# Embedded default (MiniLM, sentiment, CPU): sized so the ten required variants x (3 sweep
# LRs + 2 more seeds) fit in about an hour on 2 shared CPU cores; see README.
EMBEDDED_STEPS = 100
# Its LR grid. 100 steps is short, so the best LRs lie above demo.yaml's 1e-3 (tuned for two
# epochs), and they differ by variant: measured at seed 0, `full` is best at 2e-3 and collapses
# to chance at 4e-3, while `lora` gains from 4e-3. 5e-4 was the worst for every variant.
EMBEDDED_LRS = (1e-3, 2e-3, 4e-3)
# A best LR on the edge of the grid gets up to this many more LRs outwards.
DEFAULT_EXTEND = 2
# Seeds SELECTION_SEED, SELECTION_SEED + 1, ... select the LR; seeds 0..N-1 are reported. Far apart,
# so that no --seeds count makes the two sets meet.
SELECTION_SEED = 1000


class OutOfTime(Exception):
    """A worker's time is up: the next run was not started (see ``run_variant(may_start=...)``)."""


# -- one run ------------------------------------------------------------------------------------------
def fit_and_test(recipe: Recipe, lr: float, seed: int, run_dir: Path) -> dict:
    """One fit + test on the dev split (best checkpoint); returns the run's record, with the
    per-example predictions of the best validation (``predictions.val``) and of the dev split
    (``predictions.test``)."""
    from msplora import get_bank
    from msplora.training.run import compose, fit

    if run_dir.exists():  # leftovers of an interrupted run
        shutil.rmtree(run_dir)
    per_run = {"model.lr": lr, "seed_everything": seed}
    setup = compose(recipe.configs, {**recipe.overrides, **per_run}, recipe.extra, root_dir=run_dir)
    r = fit(setup, test=True)
    machine = machine_of(setup.trainer)
    bank_kinds = get_bank(setup.model.model).kinds
    n_layers = len(next(iter(bank_kinds.values())).layer_ids)
    levels = setup.model.hparams["pyramid"]["levels"]
    tests = {k: v for k, v in r.test.items() if k.endswith(f"/{r.metric}")}
    return {
        "task": r.task,
        "model": r.model,
        "metric": r.metric,
        "val": r.value,
        "test": r.test_value,
        "test_all": tests,
        "lr": r.lr,
        "head_lr": r.head_lr,
        "seed": r.seed,
        "levels": levels_label(levels, n_layers),
        "n_layers": n_layers,
        "trainable_params": r.trainable_params,
        "adapter_params": r.adapter_params,
        "lora_r8_adapter_params": r.lora_r8_adapter_params,
        "lora_r8_params": r.lora_r8_params,
        "params_per_level": r.params_per_level,
        "majority_baseline": r.majority_baseline,
        "global_step": r.global_step,
        "wall_time_s": r.wall_time_s,
        "fit_wall_time_s": r.fit_wall_time_s,
        "run_dir": str(r.run_dir),
        "config": setup.config_dict(),
        "metrics": {k: v for k, v in r.metrics.items() if k != "predictions"},
        "predictions": r.metrics.get("predictions", {}),
        "machine": machine,
    }


def machine_of(trainer) -> dict:
    """What a run ran on, for its record: the device (a GPU's name, else the CPU's architecture),
    how many processes and torch threads, and the versions of what computes it. Runs of one arm
    made on other machines or versions are the same runs by signature, but not bit for bit; the
    report says when a table mixes devices."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import msplora

    dev = trainer.strategy.root_device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"
    versions = {"python": platform.python_version(), "msplora": msplora.__version__}
    for pkg in ("torch", "transformers", "lightning"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"device": name, "processes": trainer.world_size, "threads": torch.get_num_threads(), **versions}


# -- the LR sweep ----------------------------------------------------------------------------------
def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def best_of(sweep: list[dict]) -> dict:
    return max(sweep, key=lambda r: r["val"])  # selection metrics here are all higher-is-better


def next_lr(tried: list[float], best: float) -> float | None:
    """The next LR outwards when `best` is the largest or smallest tried (same geometric step), else None."""
    grid = sorted(set(tried))
    if len(grid) < 2:
        return None
    if math.isclose(best, grid[-1]):
        return float(f"{grid[-1] ** 2 / grid[-2]:.6g}")
    if math.isclose(best, grid[0]):
        return float(f"{grid[0] ** 2 / grid[1]:.6g}")
    return None


# -- a variant ------------------------------------------------------------------------------------------
def run_variant(
    name: str,
    task: str,
    seeds: int,
    lrs: list[float] | None,
    config: str | None,
    steps: int | None,
    extra: list[str],
    root: Path = RESULTS,
    folder: Path = ABLATIONS,
    log=print,
    extend: int = 0,
    selection_seeds: int = 1,
    claims: bool = False,
    may_start: Callable[[], bool] | None = None,
) -> list[dict]:
    """Sweep, choose the LR, run the reported seeds; returns the reported seeds' records.

    ``may_start``: asked before each new run; False raises :class:`OutOfTime` (a worker whose time
    is up starts nothing it cannot finish; finished runs are still read).

    ``claims``: several workers share the results folder (:mod:`msplora.ablation.claims`): each run
    is claimed first, and one another worker holds is left to it. A selection run held elsewhere
    raises :class:`~msplora.ablation.claims.Busy` at once (the LR cannot be chosen yet); reported
    seeds held elsewhere are passed over, and Busy is raised once the others are done."""
    overlay = variant_path(name, folder)
    cfg = task_config(task, config)
    recipe = base_recipe(overlay, cfg, steps, extra)
    setup = parse(recipe)  # fail fast on a bad overlay / override, and read lr, head_lr, task
    data_task = setup.datamodule.hparams.task
    if data_task != task:
        raise AblationError(
            f"--task {task} but the config {cfg} trains {data_task!r}. "
            f"Fix: pass --task {data_task} (TASK={data_task}), or a config for {task}"
        )
    hp = setup.model.hparams
    lr0 = hp.lr
    # One head LR per task, whatever the variant and the swept adapter LR (signed with the run).
    recipe = dataclasses.replace(recipe, overrides={**recipe.overrides, "model.head_lr": hp.head_lr or lr0})
    head_only = not hp.get("train_adapter", True)
    lrs = lrs or (list(EMBEDDED_LRS) if is_embedded(task, config) else [lr0 * 0.5, lr0, lr0 * 2])
    if head_only:  # nothing to select: the adapter does not train
        lrs, extend = [lr0], 0
    out = root / task / name
    signature = run_signature(recipe)
    chosen_by = list(range(SELECTION_SEED, SELECTION_SEED + selection_seeds))

    def run_one(lr: float, seed: int, path: Path) -> dict:
        rec = read_result(path, signature, lr, seed)
        if rec is not None:
            log(f"[{name}] lr={lr_tag(lr)} seed={seed}: done before ({rec['test']:.4f}), skipped")
            return rec
        if claims:
            try:
                with claim(path):
                    rec = read_result(path, signature, lr, seed)  # finished elsewhere meanwhile?
                    return rec if rec is not None else run_new(lr, seed, path)
            except Busy:
                log(f"[{name}] lr={lr_tag(lr)} seed={seed}: another worker runs it")
                raise
        return run_new(lr, seed, path)

    def run_new(lr: float, seed: int, path: Path) -> dict:
        if may_start is not None and not may_start():
            raise OutOfTime(f"{name}: lr={lr_tag(lr)} seed={seed} not started")
        log(f"[{name}] lr={lr_tag(lr)} seed={seed}: running")
        rec = fit_and_test(recipe, lr, seed, out / "runs" / f"lr{lr_tag(lr)}_seed{seed}")
        rec.update(
            variant=name,
            hypothesis=hypothesis(overlay),
            signature=signature,
            protocol=PROTOCOL,
            role="selection" if seed >= SELECTION_SEED else "report",
            overlay=overlay.read_text(),
        )
        if rec.get("run_dir"):  # where it ran, relative to the results root, not this machine's absolute path
            rec["run_dir"] = os.path.relpath(rec["run_dir"], root)
        write_json_atomic(path, rec)
        log(
            f"[{name}] lr={lr_tag(lr)} seed={seed}: val {rec['val']:.4f} dev {rec['test']:.4f} "
            f"({rec['wall_time_s']:.0f} s)"
        )
        return rec

    def sweep_point(lr: float) -> dict:
        """The LR's selection runs; ``val`` is their mean validation value."""
        runs = [run_one(lr, s, out / "lr_sweep" / f"lr{lr_tag(lr)}_seed{s}.json") for s in chosen_by]
        return {"lr": lr, "val": statistics.fmean(r["val"] for r in runs)}

    sweep = [] if head_only else [sweep_point(lr) for lr in lrs]
    best = best_of(sweep) if sweep else {"lr": lr0}
    for _ in range(extend):  # a best LR on the grid's edge is not known to be the best: step outwards
        nxt = next_lr([r["lr"] for r in sweep], best["lr"])
        if nxt is None:
            break
        log(f"[{name}] best LR {lr_tag(best['lr'])} lies on the edge of the sweep: trying {lr_tag(nxt)}")
        sweep.append(sweep_point(nxt))
        best = best_of(sweep)
    selection = {
        "lr_sweep": {lr_tag(r["lr"]): r["val"] for r in sweep},
        "selection_seeds": [] if head_only else chosen_by,
    }
    records, held = [], []
    for seed in range(seeds):  # done before at the same LR counts; a seed run at an LR no longer chosen is redone
        path = out / f"seed{seed}.json"
        try:
            rec = run_one(best["lr"], seed, path)
        except Busy:
            held.append(seed)
            continue
        if {k: rec.get(k) for k in selection} != selection:  # the grid may have grown since it ran
            rec.update(selection)
            write_json_atomic(path, rec)
        records.append(rec)
    if held:
        raise Busy(f"{name}: seeds {held} are held by other workers")
    return records
