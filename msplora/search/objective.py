"""One trial = one fit: sample a pyramid, train it, return the metric (and trainable params).

objective(trial)
  |- worker_host / worker_pid user attrs first (run fails a dead worker's trial by them)
  |- past the study's N slots?  -> closed untrained as SURPLUS, this worker stops
  |- sample_levels -> overlay -> over the parameter budget? -> PRUNED, not trained
  `- fit_trial: run_fit(configs, overlay, fit_args + EXTRA)  [rank 0 of a DDP trial]
         DDP ranks 1..: Lightning re-runs the worker command; the rank finds
         MSPLORA_SEARCH_TRIAL_DIR (set by rank 0) and trains fit.json's configs and args
         there with rank 0's overlay; it never opens the study. Pruning is decided on rank 0 and
         broadcast, so every rank leaves fit together.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import yaml

from msplora.io import read_json
from msplora.search.space import (
    ModelInfo,
    SearchError,
    Space,
    adapter_params,
    overlay_of,
    sample_levels,
    sample_options,
    shape_of,
)
from msplora.search.study import HOST, LIVE, space_of
from msplora.training.run import RunResult

ENV_TRIAL_DIR = "MSPLORA_SEARCH_TRIAL_DIR"  # set by rank 0 for the DDP ranks Lightning starts


@dataclasses.dataclass
class TrialContext:
    space: Space
    info: ModelInfo
    configs: list[str]  # the space's config files; the trial's overlay goes after them
    fit_args: list[str]  # the space's fit_args + EXTRA (command-line overrides, as typed)
    out: Path  # results/search/<study>


FitFn = Callable[..., RunResult]  # (trial or None, overlay, root, ctx) -> the fit's result


class Surplus(Exception):
    """The trial was started after the study's N trials were all taken (two workers asked at once)."""


def compose_fit_args(sp: Space, extra: list[str]) -> list[str]:
    """The study's stored form of what every trial composes: ``--config`` per space config, the
    space's fit_args, then EXTRA (stored in the study, compared on a rerun; kept as it always was,
    so studies made before stay readable)."""
    out: list[str] = []
    for c in sp.configs:
        out += ["--config", c]
    return out + list(sp.fit_args) + list(extra)


def _split_fit_args(stored: list[str], configs: list[str]) -> list[str]:
    """The command-line overrides of :func:`compose_fit_args`' stored list (configs removed)."""
    head = [x for c in configs for x in ("--config", c)]
    if stored[: len(head)] != head:
        raise SearchError(
            "the study's stored fit args do not start with its space's configs. "
            "Fix: start a new study (--study NAME) for this space"
        )
    return stored[len(head) :]


def context_of(study, out_root: Path) -> TrialContext:
    """Everything a worker needs, from the study itself (``run`` stored the model's shape in it)."""
    sp = space_of(study)
    return TrialContext(
        sp,
        ModelInfo.from_dict(study.user_attrs["model_info"]),
        list(sp.configs),
        _split_fit_args(list(study.user_attrs["fit_args"]), list(sp.configs)),
        out_root / study.study_name,
    )


# -- the fit ----------------------------------------------------------------------------------------------
def dotted(overlay: dict, prefix: str = "") -> dict:
    """``{"model": {"lr": 1e-3, "pyramid": {"levels": [...]}}}`` -> ``{"model.lr": 1e-3,
    "model.pyramid.levels": [...]}``: each leaf at its key, as a YAML overlay sets it (lists whole)."""
    out: dict = {}
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= dotted(v, f"{key}.")
        else:
            out[key] = v
    return out


def run_fit(spec: dict, callbacks: list):
    """THE call into training: the run API on the trial's configs (the space's, then the overlay),
    command-line overrides and run folder. Returns the Setup (trainer, model) and the RunResult."""
    from msplora.errors import UserError
    from msplora.training.run import compose, fit

    try:
        setup = compose(spec["configs"], spec.get("overrides"), spec["args"], root_dir=spec["root"])
    except UserError as e:  # every trial would fail the same way
        raise SearchError(
            f"the fit arguments do not parse: {e}. Fix: correct the space's fit_args or the EXTRA args after --"
        ) from None
    return setup, fit(setup, callbacks=callbacks)


def _trial_callback(trial, direction: str, prune: bool):
    """Reports the module's selection metric each epoch (rank 0) and stops every rank when
    Optuna prunes; public API only (trial.report / should_prune, strategy.broadcast)."""
    from lightning.pytorch.callbacks import Callback

    class TrialCallback(Callback):
        pruned_at: int | None = None
        world_size = 1

        def on_fit_start(self, trainer, pl_module) -> None:
            self.world_size = trainer.world_size
            self.monitor, mode = pl_module.monitor
            if trial is not None and mode != direction[:3]:
                raise SearchError(
                    f"direction: {direction} but {self.monitor} is best at {mode}. "
                    f"Fix: set direction: {mode}imize in the space file"
                )

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or not prune:
                return
            stop = False
            if trial is not None and trainer.is_global_zero:
                score = trainer.callback_metrics.get(self.monitor)
                if score is not None:
                    trial.report(float(score), step=pl_module.current_epoch)
                    stop = trial.should_prune()
            if trainer.world_size > 1:  # every rank calls it once per validation, rank 0's answer wins
                stop = trainer.strategy.broadcast(stop, src=0)
            if stop:
                self.pruned_at = pl_module.current_epoch
                trainer.should_stop = True

    return TrialCallback()


def _write_pyramid(setup, root: Path) -> None:
    """What this rank actually trained: DDP tests compare ranks."""
    rank = int(os.environ.get("LOCAL_RANK", 0) or 0)
    (root / f"pyramid.rank{rank}.json").write_text(json.dumps(setup.model.pyramid.to_dict()["levels"], sort_keys=True))


def fit_trial(trial, overlay: dict, root: Path, ctx: TrialContext) -> RunResult:
    """Train one sampled config; returns the run API's result (value, trainable_params, monitor, ...)."""
    import optuna

    root.mkdir(parents=True, exist_ok=True)
    # The overlay goes to the fit as typed overrides (one composer, no text round trip); the YAML
    # beside the run is its record (`msplora fit --config ... --config overlay.yaml` reruns it).
    (root / "overlay.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    prune = not ctx.space.multi and ctx.space.pruner.get("name") != "none"
    spec = {
        "configs": list(ctx.configs),
        "overrides": dotted(overlay),
        "args": list(ctx.fit_args),
        "root": str(root),
        "prune": prune,
        "direction": ctx.space.direction,
    }
    (root / "fit.json").write_text(json.dumps(spec))  # for the DDP ranks > 0 (run_rank_child)
    callback = _trial_callback(trial, ctx.space.direction, prune)
    os.environ[ENV_TRIAL_DIR] = str(root)  # DDP ranks 1.. started inside fit inherit it
    try:
        setup, result = run_fit(spec, [callback])
    finally:
        os.environ.pop(ENV_TRIAL_DIR, None)
        if callback.world_size > 1:
            trial.study.stop()  # a DDP process group cannot be launched twice in one process: one trial per worker
    _write_pyramid(setup, root)
    if callback.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned at epoch {callback.pruned_at}")
    return result


def run_rank_child(root: Path) -> None:
    """DDP rank > 0: train rank 0's args (its overlay included) and follow its pruning decision."""
    spec = read_json(root / "fit.json", "the trial's fit.json (written by rank 0)")
    setup, _ = run_fit(spec, [_trial_callback(None, spec["direction"], spec["prune"])])
    _write_pyramid(setup, root)


# -- the objective ----------------------------------------------------------------------------------------
def _is_surplus(trial, n_trials: int) -> bool:
    """True when the study's N slots are taken by lower-numbered trials. Trial numbers are
    unique and increase, so of two trials asked at once past the N-th, only the later is surplus."""
    below = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and t.state.name in LIVE]
    return len(below) >= n_trials


def _name_metrics(study, monitor: str, multi: bool) -> None:
    """Objective names in the study, so the dashboard and plots label them."""
    import optuna

    names = [monitor, "trainable params"] if multi else [monitor]
    if study.metric_names != names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)


def make_objective(ctx: TrialContext, fit_fn: FitFn = fit_trial, n_trials: int | None = None):
    import optuna

    def objective(trial) -> float | tuple[float, float]:
        trial.set_user_attr("worker_host", HOST)
        trial.set_user_attr("worker_pid", os.getpid())
        if n_trials is not None and _is_surplus(trial, n_trials):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise Surplus(f"trial {trial.number} not run: the study's {n_trials} trials are all taken")
        try:
            return _evaluate(trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}".splitlines()[0][:500])
            if isinstance(e, SearchError):
                trial.set_user_attr("fatal", True)  # every trial would fail the same way
            log = ctx.out / "trials" / f"{trial.number:04d}" / "error.txt"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            raise

    def _evaluate(trial) -> float | tuple[float, float]:
        levels, lr = sample_levels(trial, ctx.space.space, ctx.info.n_layers)
        options = sample_options(trial, ctx.space.space, levels)
        levels = options["levels"]
        overlay = overlay_of(levels, lr, options)
        n_adapter = adapter_params(levels, ctx.info)
        budget = ctx.space.max_adapter_params
        trial.set_user_attr("overlay", overlay)
        trial.set_user_attr("adapter_params", n_adapter)
        trial.set_user_attr("ranks", [lv["rank"] for lv in levels])
        trial.set_user_attr("shape", shape_of(levels))
        trial.set_user_attr("constraint", [float(n_adapter - budget) if budget else 0.0])
        if budget and n_adapter > budget:
            raise optuna.TrialPruned(f"{n_adapter} adapter parameters > budget {budget}")
        root = ctx.out / "trials" / f"{trial.number:04d}"
        r = fit_fn(trial, overlay, root, ctx)
        if r.value is None:
            raise RuntimeError(f"trial {trial.number}: the fit gave no validation value; did validation run?")
        monitor = r.monitor or "value"
        trial.set_user_attr("monitor", monitor)
        trial.set_user_attr("trainable_params", r.trainable_params)
        trial.set_user_attr("run_dir", str(root))
        _name_metrics(trial.study, monitor, ctx.space.multi)
        value = float(r.value)
        return (value, float(r.trainable_params)) if ctx.space.multi else value

    return objective
