"""Optuna search over the pyramid: top rank, decay, level count, mid grouping (+ alpha, lr).

    python -m msplora.search run --trials N --workers W [--storage URL] [--study NAME]
                                 [--space configs/search/default.yaml] -- EXTRA_FIT_ARGS
    python -m msplora.search worker --storage URL --study NAME     # one more worker, any machine
    python -m msplora.search report [--storage URL] [--study NAME]

    run:  create the study once -> enqueue trials up to N -> spawn W workers -> wait
              |                                                    |
              |   each worker: pop a WAITING trial -> sample (define-by-run) -> fit -> tell
              |                (heartbeat thread; a dead worker's trial goes stale -> FAIL -> retried)
              v
          storage: SQLite file (default results/search/search.db), any SQLAlchemy URL
                   (PostgreSQL for several machines) or an Optuna journal file (*.log / journal:PATH)

Trials are *enqueued* by ``run`` and only *popped* by workers, so the study holds exactly N
finished trials however many workers race for them (``study.optimize`` + MaxTrialsCallback can
overshoot by W - 1). A trial's sampled pyramid becomes an ablation-style overlay
(``model: {pyramid: {levels: [...]}, lr: ...}``) given to ``fit`` after the space's configs.

DDP trials (``-- --trainer.devices=2 --trainer.strategy=ddp``): Lightning re-runs this worker
command for ranks 1..; those processes see ``MSPLORA_SEARCH_TRIAL_ID`` and, instead of popping,
open the same trial read-only (a suggest on a parameter already set returns the stored value, so
every rank trains the same config). optuna-integration's pruning callback decides on rank 0 and
broadcasts ``should_stop`` so every rank leaves ``fit`` together; rank 0 then raises TrialPruned.
A DDP process group cannot be re-launched in one process, so a DDP worker runs one trial and
exits; ``run`` starts it again while trials wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from msplora.io import split_passthrough
from msplora.pyramid import group_sizes, parameter_count, rank_schedule

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = REPO / "configs" / "search" / "default.yaml"
DEFAULT_OUT = Path("results") / "search"
DEFAULT_STORAGE = DEFAULT_OUT / "search.db"
ENV_TRIAL = "MSPLORA_SEARCH_TRIAL_ID"
FINISHED = ("COMPLETE", "PRUNED")


class SearchError(ValueError):
    """Bad search input; the message names the problem and the fix."""


# -- the space file ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Space:
    """A parsed, validated ``configs/search/*.yaml`` (see configs/search/default.yaml)."""

    name: str
    objective: str = "single"
    direction: str = "maximize"
    max_adapter_params: int | None = None
    space: dict = dataclasses.field(default_factory=dict)
    sampler: dict = dataclasses.field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = dataclasses.field(default_factory=lambda: {"name": "median"})
    configs: list[str] = dataclasses.field(default_factory=lambda: ["configs/base.yaml"])
    fit_args: list[str] = dataclasses.field(default_factory=list)

    @property
    def multi(self) -> bool:
        return self.objective == "multi"

    @property
    def directions(self) -> list[str]:
        return [self.direction, "minimize"] if self.multi else [self.direction]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Space:
        return cls(**d)


_SPACE_KEYS = {"r0", "decay", "n_levels", "grouping", "alpha", "lr"}


def load_space(path: str | Path) -> Space:
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"--space {path}: no such file. Fix: give a file like {DEFAULT_SPACE.relative_to(REPO)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SearchError(f"{path}: not a mapping. Fix: see {DEFAULT_SPACE.name} for the layout")
    known = {"objective", "direction", "budget", "space", "sampler", "pruner", "configs", "fit_args"}
    if set(raw) - known:
        raise SearchError(f"{path}: unknown keys {sorted(set(raw) - known)}. Fix: use only {sorted(known)}")
    sp = Space(name=path.stem)
    for k in ("objective", "direction", "sampler", "pruner", "configs", "fit_args"):
        if raw.get(k) is not None:
            setattr(sp, k, raw[k])
    sp.max_adapter_params = (raw.get("budget") or {}).get("max_adapter_params")
    sp.space = raw.get("space") or {}
    _validate_space(sp, path)
    sp.configs = [str(_repo_path(c)) for c in sp.configs]
    return sp


def _repo_path(p: str) -> Path:
    """Config paths in a space file are relative to the working directory, else to the repo."""
    return Path(p) if Path(p).exists() or Path(p).is_absolute() else REPO / p


def _validate_space(sp: Space, path: Path) -> None:
    def bad(field: str, problem: str, fix: str) -> None:
        raise SearchError(f"{path}: {field}: {problem}. Fix: {fix}")

    if sp.objective not in ("single", "multi"):
        bad("objective", f"{sp.objective!r} is unknown", "use single or multi")
    if sp.direction not in ("maximize", "minimize"):
        bad("direction", f"{sp.direction!r} is unknown", "use maximize or minimize")
    if set(sp.space) - _SPACE_KEYS:
        bad("space", f"unknown keys {sorted(set(sp.space) - _SPACE_KEYS)}", f"use only {sorted(_SPACE_KEYS)}")
    for k in ("r0", "n_levels"):
        v = sp.space.get(k)
        if not (isinstance(v, list) and v and all(isinstance(x, int) and x >= 1 for x in v)):
            bad(f"space.{k}", f"{v!r} is not a non-empty list of integers >= 1", f"e.g. {k}: [1, 2, 3, 4]")
    if max(sp.space["n_levels"]) > 4:
        bad("space.n_levels", "more than 4 levels", "use values from 1 (plain LoRA) to 4")
    d = sp.space.get("decay", [0.5])
    values = d if isinstance(d, list) else [d.get("low"), d.get("high")] if isinstance(d, dict) else [d]
    if not values or not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in values):
        bad("space.decay", f"{d!r} is not in (0, 1]", "ranks must not grow toward finer levels: e.g. [0.25, 0.5, 1.0]")
    g = sp.space.get("grouping") or {"by": "groups", "choices": [3]}
    if g.get("by") not in ("groups", "group_size") or not g.get("choices"):
        bad("space.grouping", f"{g!r}", "use {by: groups, choices: [2, 3]} or {by: group_size, choices: [2, 3]}")
    if sp.max_adapter_params is not None and not (isinstance(sp.max_adapter_params, int) and sp.max_adapter_params > 0):
        bad("budget.max_adapter_params", f"{sp.max_adapter_params!r}", "use a positive integer or null")
    if sp.sampler.get("name") not in ("tpe", "nsga2", "random"):
        bad("sampler.name", f"{sp.sampler.get('name')!r}", "use tpe, nsga2 or random")
    if sp.pruner.get("name") not in ("median", "threshold", "none"):
        bad("pruner.name", f"{sp.pruner.get('name')!r}", "use median, threshold or none")
    if not isinstance(sp.fit_args, list) or not all(isinstance(a, str) for a in sp.fit_args):
        bad("fit_args", "not a list of strings", "write one --key=value per list item")
    for c in sp.configs:
        if not _repo_path(c).is_file():
            bad("configs", f"{c} does not exist", "list existing fit configs, e.g. configs/base.yaml")


# -- the model the search runs on -------------------------------------------------------------------
@dataclasses.dataclass
class ModelInfo:
    n_layers: int
    shapes: dict[str, tuple[int, int]]  # target kind -> (d_in, d_out)


def _resolved_value(configs: list[str], args: list[str], dotted: str, default: Any = None) -> Any:
    """The value of ``model.model`` (etc.) after composing the YAML files and ``--key=value`` args."""
    value = default
    for c in configs:
        node = yaml.safe_load(Path(c).read_text()) or {}
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    for a in args:
        if a.startswith(f"--{dotted}="):
            value = yaml.safe_load(a.split("=", 1)[1])
    return value


def model_info(configs: list[str], args: list[str]) -> ModelInfo:
    """Layer count and target shapes from the model's config, on the meta device (no weights),
    found exactly as `inject` finds them."""
    import torch
    from transformers import AutoConfig, AutoModel

    from msplora.config import ConfigError, MSPLoRAConfig
    from msplora.hf import resolve_model
    from msplora.inject import target_layout

    name = _resolved_value(configs, args, "model.model", "minilm")
    targets = _resolved_value(configs, args, "model.pyramid.targets", ["query", "value"])
    cfg = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    try:
        layout = target_layout(model, MSPLoRAConfig(targets=targets))
    except ConfigError as e:
        raise SearchError(f"model {name}: {e}") from None
    layers = {i for kind in layout.values() for i in kind["layers"]}
    return ModelInfo(len(layers), {k: (int(v["d_in"]), int(v["d_out"])) for k, v in layout.items()})


# -- define-by-run sampling ---------------------------------------------------------------------------
def _suggest(trial, name: str, spec: Any):
    if spec is None:
        return None
    if isinstance(spec, list):
        return spec[0] if len(spec) == 1 else trial.suggest_categorical(name, spec)
    if isinstance(spec, dict):
        lo, hi, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if isinstance(lo, int) and isinstance(hi, int) and not log:
            return trial.suggest_int(name, lo, hi)
        return trial.suggest_float(name, float(lo), float(hi), log=log)
    return spec


def mid_choices(n_layers: int, grouping: dict, n_mid: int) -> list[str]:
    """Valid mid-level groupings, as strings: ``"3"`` for one mid level, ``"2-4"`` for two.

    A mid level is valid when it has more than one cell and fewer cells than layers (else it is
    the global or the layer level again); two mid levels must go from coarser to finer.
    """
    by = grouping["by"]

    def cells(v: int) -> int:
        return len(group_sizes(n_layers, **{by: v})) if (by == "group_size" or v <= n_layers) else n_layers

    ok = sorted({v for v in grouping["choices"] if 1 < cells(v) < n_layers}, key=cells)
    if n_mid == 1:
        return [str(v) for v in ok]
    return [f"{a}-{b}" for i, a in enumerate(ok) for b in ok[i + 1 :] if cells(a) < cells(b)]


def sample_levels(trial, space: dict, n_layers: int) -> tuple[list[dict], float | None]:
    """Sample one pyramid: levels (coarse -> fine, ranks non-increasing) and the lr (None = config's)."""
    grouping = space.get("grouping") or {"by": "groups", "choices": [3]}
    feasible = [n for n in space["n_levels"] if n <= 2 or mid_choices(n_layers, grouping, n - 2)]
    if not feasible:
        raise SearchError(
            f"space.n_levels {space['n_levels']}: no valid shape for {n_layers} layers. "
            "Fix: allow 1 or 2 levels, or grouping choices with 1 < cells < layers"
        )
    n_levels = feasible[0] if len(feasible) == 1 else trial.suggest_categorical("n_levels", feasible)
    r0 = _suggest(trial, "r0", space["r0"])
    decay = _suggest(trial, "decay", space.get("decay", [0.5])) if n_levels > 1 else 1.0
    alpha = float(_suggest(trial, "alpha", space.get("alpha", [16])))
    lr = _suggest(trial, "lr", space.get("lr"))
    shares: list[dict] = [{"share": "layer"}]
    if n_levels >= 2:
        shares = [{"share": "global"}, {"share": "layer"}]
    if n_levels >= 3:
        # One categorical per level count: TPE / NSGA-II see a fixed choice list per name.
        choices = mid_choices(n_layers, grouping, n_levels - 2)
        mids = trial.suggest_categorical(f"mid_{grouping['by']}_{n_levels}", choices)
        shares[1:1] = [{"share": "group", grouping["by"]: int(v)} for v in str(mids).split("-")]
    ranks = rank_schedule(n_levels, r0, decay)
    return [{**s, "rank": r, "alpha": alpha} for s, r in zip(shares, ranks)], lr


def overlay_of(levels: list[dict], lr: float | None) -> dict:
    model: dict[str, Any] = {"pyramid": {"levels": levels}}
    if lr is not None:
        model["lr"] = float(lr)
    return {"model": model}


def adapter_params(levels: list[dict], info: ModelInfo) -> int:
    return parameter_count(levels, info.n_layers, info.shapes)


# -- storage, study, samplers -----------------------------------------------------------------------
def storage_url(storage: str | None) -> str:
    """``None`` -> the default SQLite file; ``x.db`` -> sqlite; ``*.log`` or ``journal:PATH`` -> journal."""
    s = storage or str(DEFAULT_STORAGE)
    if "://" in s or s.startswith("journal:"):
        return s
    if s.endswith((".log", ".jsonl", ".journal")):
        return f"journal:{s}"
    if s.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{s}"
    raise SearchError(
        f"--storage {s!r}: unknown kind. Fix: give a SQLAlchemy URL (sqlite:///x.db, "
        "postgresql+psycopg2://user:pw@host/db), a .db file or a journal file (.log / journal:PATH)"
    )


def open_storage(storage: str | None, heartbeat: int | None = None, grace: int | None = None):
    import optuna

    url = storage_url(storage)
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # Two workers writing one file wait for the lock instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat:
        kwargs.update(
            heartbeat_interval=heartbeat,
            grace_period=grace or 3 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # bad URL, server down, missing driver
            raise SearchError(
                f"--storage {url}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Fix: check the URL and that the database server is running"
            ) from e


def build_sampler(sp: Space, seed: int | None = None):
    import optuna

    cfg = dict(sp.sampler)
    name = cfg.pop("name")
    base_seed = cfg.pop("seed", None)
    seed = None if base_seed is None else base_seed + (seed or 0)
    constraints = _constraints if sp.max_adapter_params else None
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints, **cfg)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints, **cfg)


def _constraints(trial) -> list[float]:
    """<= 0 is feasible: adapter parameters over the budget."""
    return trial.user_attrs.get("constraint", [0.0])


def build_pruner(sp: Space):
    import optuna

    cfg = dict(sp.pruner)
    name = cfg.pop("name")
    if name == "none" or sp.multi:
        return optuna.pruners.NopPruner()
    if name == "threshold":
        return optuna.pruners.ThresholdPruner(**cfg)
    return optuna.pruners.MedianPruner(**cfg)


def create_study(storage, name: str, sp: Space, fit_args: list[str]):
    """Create the study once (or load it) and check it was made with the same space and fit args."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, directions=sp.directions, load_if_exists=True)
    attrs = study.user_attrs
    mine = {"space": sp.to_dict(), "fit_args": fit_args}
    if "space" not in attrs:
        for k, v in mine.items():
            study.set_user_attr(k, v)
    elif (
        [str(d.name).lower() for d in study.directions] != sp.directions
        or attrs["space"] != mine["space"]
        or attrs["fit_args"] != fit_args
    ):
        raise SearchError(
            f"study {name!r} exists with another space, objective or fit args. "
            "Fix: pass a new --study name, or rerun with the same --space and EXTRA args"
        )
    return study


def load_study(storage, name: str, seed: int | None = None):
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as e:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(f"study {name!r} not found (storage has {names}). Fix: pass --study, or `run` first") from e
    if "space" not in study.user_attrs:
        return study
    sp = Space.from_dict(study.user_attrs["space"])
    study.sampler = build_sampler(sp, seed)
    study.pruner = build_pruner(sp)
    return study


def counts(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def top_up(study, n_trials: int) -> int:
    """Enqueue trials so that finished + running + waiting == n_trials; returns how many were added."""
    c = counts(study)
    live = sum(c.get(s, 0) for s in ("COMPLETE", "PRUNED", "RUNNING", "WAITING"))
    for _ in range(max(0, n_trials - live)):
        study.enqueue_trial({}, user_attrs={"enqueued_by": "run"})
    return max(0, n_trials - live)


# -- one trial = one fit ------------------------------------------------------------------------------
FitFn = Callable[..., dict]


@dataclasses.dataclass
class TrialContext:
    space: Space
    info: ModelInfo
    fit_args: list[str]  # configs + fit_args + extra, without the overlay
    out: Path  # results/search/<study>


def fit_trial(trial, overlay: dict, root: Path, ctx: TrialContext, owner: bool = True) -> dict:
    """Train one config with ``fit``; returns metrics.json (value, trainable_params, ...)."""
    from optuna_integration import PyTorchLightningPruningCallback

    from msplora.training.cli import cli_main

    class Pruning(PyTorchLightningPruningCallback):
        """Reports the module's own selection metric (known once the data is) at each epoch."""

        def on_fit_start(self, trainer, pl_module) -> None:
            self.monitor, mode = pl_module.monitor
            if mode != ctx.space.direction[:3]:
                raise SearchError(
                    f"direction: {ctx.space.direction} but {self.monitor} is best at {mode}. "
                    f"Fix: set direction: {mode}imize in the space file"
                )
            super().on_fit_start(trainer, pl_module)

    path = root / "overlay.yaml"
    if owner:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(overlay, sort_keys=False))
    args = [*ctx.fit_args, "--config", str(path), f"--trainer.default_root_dir={root}"]
    try:
        cli = cli_main(args, run=False)
    except SystemExit as e:  # jsonargparse printed the bad argument; every trial would fail the same way
        raise SearchError(
            f"the fit arguments do not parse (exit {e.code}; message above): {args}. "
            "Fix: correct the space's fit_args or the EXTRA args after --"
        ) from None
    callback = None
    if not ctx.space.multi and ctx.space.pruner.get("name") != "none":
        callback = Pruning(trial, "val")
        cli.trainer.callbacks.append(callback)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        if cli.trainer.world_size > 1:
            trial.study._stop_flag = True  # this process group cannot be launched again: the worker exits
    if not owner:
        return {}
    if callback is not None:
        callback.check_pruned()  # DDP: the decision rank 0 stored; no-op otherwise
    metrics = json.loads(next(root.rglob("metrics.json")).read_text())
    return metrics


def make_objective(ctx: TrialContext, fit_fn: FitFn = fit_trial, owner: bool = True):
    import optuna

    def objective(trial) -> float | tuple[float, float]:
        levels, lr = sample_levels(trial, ctx.space.space, ctx.info.n_layers)
        overlay = overlay_of(levels, lr)
        n_adapter = adapter_params(levels, ctx.info)
        budget = ctx.space.max_adapter_params
        if owner:
            trial.set_user_attr("overlay", overlay)
            trial.set_user_attr("adapter_params", n_adapter)
            trial.set_user_attr("ranks", [lv["rank"] for lv in levels])
            trial.set_user_attr(
                "shape",
                "/".join(
                    lv.get("share")
                    if lv["share"] != "group"
                    else f"g{lv.get('groups') or 's' + str(lv.get('group_size'))}"
                    for lv in levels
                ),
            )
            trial.set_user_attr("constraint", [float(n_adapter - budget) if budget else 0.0])
            trial.set_user_attr("worker_pid", os.getpid())
        if budget and n_adapter > budget:
            raise optuna.TrialPruned(f"{n_adapter} adapter parameters > budget {budget}")
        root = ctx.out / "trials" / f"{trial.number:04d}"
        m = fit_fn(trial, overlay, root, ctx, owner=owner)
        if not owner:
            return 0.0
        if m.get("value") is None:
            raise RuntimeError(f"trial {trial.number}: no validation value in metrics.json; did validation run?")
        trial.set_user_attr("monitor", m.get("monitor", "value"))
        trial.set_user_attr("trainable_params", m.get("trainable_params"))
        trial.set_user_attr("run_dir", str(root))
        value = float(m["value"])
        return (value, float(m["trainable_params"])) if ctx.space.multi else value

    return objective


# -- the worker loop ----------------------------------------------------------------------------------
class _Heartbeat:
    """Records the trial's heartbeat every interval, so a dead worker's trial goes stale."""

    def __init__(self, storage, trial_id: int, interval: int | None) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient DB error must not kill the trial
                pass

    def __enter__(self):
        if self.interval and hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()


def work(
    study, storage, ctx: TrialContext, fit_fn: FitFn = fit_trial, heartbeat: int | None = None, max_failures: int = 3
) -> int:
    """Take WAITING trials until none is left; returns the number of trials this worker ran."""
    import optuna
    from optuna.trial import TrialState

    objective = make_objective(ctx, fit_fn)
    ran = failures = 0
    study._stop_flag = False
    while not study._stop_flag:
        with _queue_lock(storage):
            _fail_stale(study)  # retries a dead worker's trial (enqueues a copy)
            trial_id = study._pop_waiting_trial_id()  # WAITING -> RUNNING: never two owners
        if trial_id is None:
            break
        study._thread_local.cached_all_trials = None  # as Study.ask: the sampler sees other workers' trials
        trial = optuna.Trial(study, trial_id)
        os.environ[ENV_TRIAL] = str(trial_id)  # DDP ranks 1.. launched by Lightning inherit it
        with _Heartbeat(storage, trial_id, heartbeat):
            try:
                values = objective(trial)
                study.tell(trial, values)
                failures = 0
                print(f"[worker {os.getpid()}] trial {trial.number} complete: {values}", flush=True)
            except optuna.TrialPruned as e:
                study.tell(trial, state=TrialState.PRUNED)
                print(f"[worker {os.getpid()}] trial {trial.number} pruned: {e}", flush=True)
            except (Exception, KeyboardInterrupt) as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
                study.tell(trial, state=TrialState.FAIL)
                print(f"[worker {os.getpid()}] trial {trial.number} failed:\n{traceback.format_exc()}", flush=True)
                if isinstance(e, (KeyboardInterrupt, SearchError)):
                    raise
                failures += 1
                if failures >= max_failures:
                    raise SearchError(
                        f"{failures} trials failed in a row (last: {type(e).__name__}: {e}). "
                        "Fix: run one fit with the same args by hand and read its error"
                    ) from e
            finally:
                os.environ.pop(ENV_TRIAL, None)
        ran += 1
    return ran


def _queue_lock(storage):
    """A lock around taking a WAITING trial, where the storage cannot make that atomic itself.

    Optuna pops a WAITING trial by reading its state and then writing RUNNING; the row lock
    (SELECT ... FOR UPDATE) that makes this atomic on PostgreSQL/MySQL does not exist in SQLite,
    so two workers on one SQLite file could both take the same trial. For SQLite, a file lock
    beside the database serialises the pop (workers sharing a SQLite file share a file system).
    The journal storage's pop is already safe across processes.
    """
    import contextlib

    url = getattr(getattr(storage, "engine", None), "url", None)
    if url is None or url.get_backend_name() != "sqlite" or not url.database:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{url.database}.queue.lock")


def _fail_stale(study) -> None:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _child_rank_trial(study, ctx: TrialContext, fit_fn: FitFn) -> None:
    """DDP rank > 0: train the trial rank 0 owns, with the same sampled config; write nothing."""
    import optuna

    trial = optuna.Trial(study, int(os.environ[ENV_TRIAL]))
    make_objective(ctx, fit_fn, owner=False)(trial)
    rank = os.environ.get("LOCAL_RANK", "?")
    root = ctx.out / "trials" / f"{trial.number:04d}"
    (root / f"params.rank{rank}.json").write_text(json.dumps(trial.params, sort_keys=True))


def context_of(study, out_root: Path) -> TrialContext:
    sp = Space.from_dict(study.user_attrs["space"])
    fit_args = list(study.user_attrs["fit_args"])
    info = model_info(sp.configs, fit_args)
    return TrialContext(sp, info, fit_args, out_root / study.study_name)


def _fit_args(sp: Space, extra: list[str]) -> list[str]:
    out: list[str] = []
    for c in sp.configs:
        out += ["--config", c]
    return out + list(sp.fit_args) + list(extra)


def _import(spec: str) -> FitFn:
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def worker_devices(index: int, n_gpus: int, per_trial: int = 1) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for worker ``index``: its own ``per_trial`` GPUs (round robin), or None."""
    if n_gpus <= 0:
        return None
    per_trial = max(1, min(per_trial, n_gpus))
    slots = max(1, n_gpus // per_trial)
    first = (index % slots) * per_trial
    return ",".join(str(first + i) for i in range(per_trial))


def _devices_per_trial(fit_args: list[str]) -> int:
    v = _resolved_value([], fit_args, "trainer.devices", 1)
    return v if isinstance(v, int) and v > 0 else 1


# -- commands -----------------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace, extra: list[str]) -> int:
    import optuna

    sp = load_space(a.space)
    fit_args = _fit_args(sp, extra)
    name = a.study or sp.name
    if a.trials < 1 or a.workers < 1:
        raise SearchError("--trials and --workers must be >= 1. Fix: e.g. --trials 20 --workers 2")
    storage = open_storage(a.storage, a.heartbeat, a.grace)
    if not a.fit_fn:
        model_info(sp.configs, fit_args)  # fails early on a model / targets that cannot work
    study = create_study(storage, name, sp, fit_args)
    with _queue_lock(storage):  # other machines' workers may be failing stale trials too
        _fail_stale(study)
    added = top_up(study, a.trials)
    print(f"study {name!r} on {storage_url(a.storage)}: {counts(study)} (enqueued {added})", flush=True)
    n_gpus = _gpu_count()
    per_trial = _devices_per_trial(fit_args)
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    procs: list[subprocess.Popen] = []

    stopping: list[float] = []

    def stop_workers(*_):
        # SIGINT, not SIGTERM: Lightning only notes a SIGTERM and trains on; a KeyboardInterrupt ends
        # fit and the worker marks its trial FAIL (a rerun replaces it). A second signal kills.
        sig = signal.SIGKILL if stopping else signal.SIGINT
        stopping.append(time.time())
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)

    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)
    t0 = time.time()
    while not stopping:
        c = counts(study)
        done = sum(c.get(s, 0) for s in FINISHED)
        if done >= a.trials:
            break
        if not c.get("WAITING"):
            if c.get("RUNNING"):  # another machine's worker, or a dead one whose heartbeat will go stale
                if not optuna.storages.is_heartbeat_enabled(storage):
                    print(
                        f"{c['RUNNING']} trial(s) still RUNNING and this storage has no heartbeat (journal), "
                        "so a dead worker's trial cannot be told from a live one. Fix: rerun when other "
                        "workers are done, or use an RDB storage (SQLite / PostgreSQL)",
                        file=sys.stderr,
                    )
                    return 1
                time.sleep(a.heartbeat or 5)
                with _queue_lock(storage):
                    _fail_stale(study)
            top_up(study, a.trials)
            continue
        procs = []
        for i in range(min(a.workers, c["WAITING"])):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
            dev = worker_devices(i, n_gpus, per_trial)
            if dev is not None:
                env["CUDA_VISIBLE_DEVICES"] = dev
            cmd = [
                sys.executable,
                "-m",
                "msplora.search",
                "worker",
                "--storage",
                storage_url(a.storage),
                "--study",
                name,
                "--out",
                str(a.out),
                "--index",
                str(i),
                "--heartbeat",
                str(a.heartbeat),
                "--grace",
                str(a.grace),
            ] + (["--fit-fn", a.fit_fn] if a.fit_fn else [])
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            if stopping and time.time() - stopping[0] > 30:
                stop_workers()
        rcs = [p.wait() for p in procs]
        if stopping:
            print(f"stopped; {counts(study)}. Rerun the same command to continue.", file=sys.stderr)
            return 130
        if any(rcs):
            print(f"worker exit codes {rcs}; see the messages above. {counts(study)}", file=sys.stderr)
            return 1
    if stopping:
        return 130
    print(f"study {name!r}: {counts(study)} in {time.time() - t0:.0f} s", flush=True)
    return 0


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def cmd_worker(a: argparse.Namespace) -> int:
    child = bool(os.environ.get(ENV_TRIAL)) and os.environ.get("LOCAL_RANK", "0") != "0"
    storage = open_storage(a.storage, None if child else a.heartbeat, a.grace)
    study = load_study(storage, a.study)
    # Workers differ in seed (else they would propose the same configs), and so do restarts.
    study.sampler = build_sampler(
        Space.from_dict(study.user_attrs["space"]), seed=(a.index + 1) * 1000 + len(study.get_trials(deepcopy=False))
    )
    ctx = context_of(study, Path(a.out))
    fit_fn = _import(a.fit_fn) if a.fit_fn else fit_trial
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if child:
        _child_rank_trial(study, ctx, fit_fn)
        return 0
    work(study, storage, ctx, fit_fn, heartbeat=a.heartbeat)
    return 0


# -- report -------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_table(trials, multi: bool, monitor: str) -> str:
    head = ["trial", monitor, "trainable", "adapter", "levels (share:rank)", "alpha", "lr"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        ov = t.user_attrs.get("overlay", {}).get("model", {})
        lv = ov.get("pyramid", {}).get("levels", [])
        shape = " ".join(
            f"{x['share'] if x['share'] != 'group' else 'g' + str(x.get('groups') or 's' + str(x.get('group_size')))}"
            f":{x['rank']}"
            for x in lv
        )
        alpha = sorted({x.get("alpha") for x in lv})
        value = t.values[0] if t.values else None
        trainable = t.values[1] if multi and t.values else t.user_attrs.get("trainable_params")
        rows.append(
            "| "
            + " | ".join(
                _fmt(x)
                for x in (
                    t.number,
                    value,
                    int(trainable) if trainable is not None else "-",
                    t.user_attrs.get("adapter_params", "-"),
                    shape,
                    ",".join(_fmt(a) for a in alpha),
                    ov.get("lr", "config"),
                )
            )
            + " |"
        )
    return "\n".join(rows)


def best_overlay_text(study, trial, monitor: str) -> str:
    value = trial.values[0]
    head = (
        f"# Optuna study {study.study_name!r}, trial {trial.number}: {monitor} = {value:.4f} "
        f"(selection split), {trial.user_attrs.get('trainable_params')} trainable params.\n"
        "# Use: msplora fit --config configs/base.yaml --config configs/demo.yaml --config best.yaml\n"
    )
    return head + yaml.safe_dump(trial.user_attrs["overlay"], sort_keys=False)


def report(study, out_dir: Path, top: int = 10) -> str:
    """Write summary.md, best.yaml, front/*.yaml and PNGs under out_dir; return the markdown."""
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    sp = Space.from_dict(study.user_attrs["space"]) if "space" in study.user_attrs else None
    multi = len(study.directions) > 1
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    if not complete:
        raise SearchError(
            f"study {study.study_name!r} has no complete trial yet ({counts(study)}). "
            "Fix: let `run` finish some trials first"
        )
    monitor = complete[0].user_attrs.get("monitor", "value")
    sign = 1 if study.directions[0].name == "MAXIMIZE" else -1
    ranked = sorted(complete, key=lambda t: -sign * t.values[0])
    lines = [
        f"# Search `{study.study_name}`",
        "",
        f"Objective: {'metric vs trainable params (NSGA-II)' if multi else 'validation metric'}; "
        f"trials: {counts(study)}; space: `{sp.name if sp else '?'}`.",
        "",
        f"## Best {min(top, len(ranked))} trials by {monitor}",
        "",
        trials_table(ranked[:top], multi, monitor),
    ]
    best = ranked[0]
    (out_dir / "best.yaml").write_text(best_overlay_text(study, best, monitor))
    if multi:
        front = sorted(study.best_trials, key=lambda t: t.values[1])
        lines += ["", f"## Pareto front ({monitor} up, trainable params down)", "", trials_table(front, multi, monitor)]
        fdir = out_dir / "front"
        fdir.mkdir(exist_ok=True)
        for old in fdir.glob("*.yaml"):
            old.unlink()
        for t in front:
            (fdir / f"trial_{t.number:04d}.yaml").write_text(best_overlay_text(study, t, monitor))
    plots = _plots(study, out_dir, multi, monitor, len(complete))
    lines += [
        "",
        "Best config: `best.yaml`"
        + (" (front members: `front/`)" if multi else "")
        + "; plots: "
        + ", ".join(f"`{p.name}`" for p in plots),
    ]
    md = "\n".join(lines) + "\n"
    (out_dir / "summary.md").write_text(md)
    return md


def _plots(study, out_dir: Path, multi: bool, monitor: str, n_complete: int) -> list[Path]:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    target = (lambda t: t.values[0]) if multi else None
    jobs = [("history.png", lambda: ovm.plot_optimization_history(study, target=target, target_name=monitor))]
    if n_complete >= 2:
        jobs.append(("importances.png", lambda: ovm.plot_param_importances(study, target=target, target_name=monitor)))
    if multi:
        jobs.append(
            ("pareto_front.png", lambda: ovm.plot_pareto_front(study, target_names=[monitor, "trainable params"]))
        )
    done = []
    for fname, fn in jobs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = fn()
            except (ValueError, RuntimeError) as e:  # e.g. importances with a constant objective
                print(f"skipped {fname}: {e}", file=sys.stderr)
                continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        done.append(out_dir / fname)
    return done


def cmd_report(a: argparse.Namespace) -> int:
    import optuna

    storage = open_storage(a.storage)
    name = a.study
    if name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if len(names) != 1:
            raise SearchError(f"storage holds studies {names}. Fix: pass --study NAME")
        name = names[0]
    study = load_study(storage, name)
    print(report(study, Path(a.out) / name, a.top), end="")
    print(f"\nwritten under {Path(a.out) / name}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m msplora.search", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q, storage_help=f"SQLAlchemy URL, .db file or journal file (.log); default {DEFAULT_STORAGE}"):
        q.add_argument("--storage", default=None, help=storage_help)
        q.add_argument("--out", default=str(DEFAULT_OUT), help="outputs: <out>/<study>/{trials,summary.md,...}")

    r = sub.add_parser("run", help="create the study once, enqueue trials, run W workers")
    common(r)
    r.add_argument("--trials", type=int, default=20, help="finished (complete + pruned) trials wanted")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--study", default=None, help="default: the space file's stem")
    r.add_argument("--space", default=str(DEFAULT_SPACE))
    w = sub.add_parser("worker", help="take waiting trials of an existing study until none is left")
    common(w)
    w.add_argument("--study", required=True)
    w.add_argument("--index", type=int, default=0, help="worker number (sampler seed, device)")
    w.add_argument("--threads", type=int, default=0, help="torch threads (0: OMP_NUM_THREADS / torch default)")
    for q in (r, w):
        q.add_argument("--heartbeat", type=int, default=10, help="seconds between trial heartbeats (RDB storage)")
        q.add_argument("--grace", type=int, default=60, help="seconds without heartbeat before a trial is failed")
        q.add_argument("--fit-fn", default=None, help=argparse.SUPPRESS)  # tests: module:function replacing fit
    rep = sub.add_parser("report", help="best trials, Pareto front, plots, best config overlay")
    common(rep)
    rep.add_argument("--study", default=None, help="default: the storage's only study")
    rep.add_argument("--top", type=int, default=10)
    a = p.parse_args(argv)
    if extra and a.cmd != "run":
        p.error("EXTRA fit args after -- are given to `run` only")
    try:
        if a.cmd == "run":
            return cmd_run(a, extra)
        if a.cmd == "worker":
            return cmd_worker(a)
        return cmd_report(a)
    except SearchError as e:
        print(f"msplora.search: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
