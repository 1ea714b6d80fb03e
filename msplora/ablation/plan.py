"""Plans: a comparison's runs written down before they start (arms, seeds, LR grid, margin, the
key comparisons), and run by any number of workers that share the results folder.

    ablations/plans/<name>.yaml          the plan (docs/protocol.md says why each value)
    msplora ablation plan NAME           work on it until every run is done, then the report
        --workers N                      N local worker processes, cores split between them
        --status                         what is done, what is running where, what is left

A worker goes in rounds: every arm up to ``round`` reported seeds, then up to 2 x ``round``, ...
up to ``seeds``, so the arms stay level and an interrupted plan leaves comparable arms behind;
``fixed`` arms (e.g. ``head_only: 3``) come after the first round. Each run is claimed
(:mod:`msplora.ablation.claims`), so workers on other processes, GPUs or machines pointed at the
same results folder share the plan without running anything twice: a run another worker holds is
left to it, an arm whose LR is still being selected elsewhere is passed over for now, and a
worker with nothing left but other workers' runs waits for them (their runs may fail), then ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from msplora.ablation.claims import SUFFIX, Busy, holder
from msplora.ablation.runner import DEFAULT_EXTEND, EMBEDDED_STEPS, SELECTION_SEED, OutOfTime, run_variant
from msplora.ablation.variants import (
    ABLATIONS,
    CONFIGS,
    RESULTS,
    AblationError,
    is_embedded,
    variant_names,
    variant_path,
)

PLANS = ABLATIONS / "plans"
POLL_S = 30.0  # how often a worker with only other workers' runs left looks again


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    task: str
    arms: tuple[str, ...]
    seeds: int
    config: str | None = None
    round: int = 2
    fixed: dict[str, int] = dataclasses.field(default_factory=dict)  # arm -> its own seed count
    lrs: tuple[float, ...] | None = None
    extend: int = DEFAULT_EXTEND
    selection_seeds: int = 1
    baseline: str | None = None
    margin: float = 1.0
    compare: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()  # CLI overrides for every run
    steps: int | None = None  # training steps per run (None: the config's epochs; the embedded task: EMBEDDED_STEPS)
    folder: str | None = None  # the plan's own results folder under the root (None: the root itself)

    def results(self, root: Path) -> Path:
        """The root this plan's runs go under: ``<root>/<folder>/<task>/<arm>/``. A plan that runs
        arms of an earlier plan again with another recipe (LRs, epochs) needs its own folder: in
        the earlier plan's, it would redo that plan's reported seeds at its own LR."""
        return root / self.folder if self.folder else root

    def targets(self) -> list[tuple[str, int]]:
        """(arm, reported seeds wanted), in the order a worker takes them."""
        out = []
        n = 0
        while n < self.seeds:
            n = min(n + self.round, self.seeds)
            out += [(arm, n) for arm in self.arms]
            if n == min(self.round, self.seeds):
                out += list(self.fixed.items())
        return out


FIELDS = {f.name for f in dataclasses.fields(Plan)} - {"name"}


def plan_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise AblationError(f"plan {name_or_path}: no such file. Fix: give a plan file or a name in {PLANS}")
        return path
    path = PLANS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PLANS.glob("*.yaml"))
        raise AblationError(f"unknown plan {name_or_path!r}. Fix: use one of {', '.join(known)} or a plan file path")
    return path


def load_plan(name_or_path: str) -> Plan:
    """The plan, every value checked (one line naming the bad one)."""
    path = plan_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise AblationError(f"{path}: not valid YAML ({str(e).splitlines()[0]}). Fix: correct the file") from None
    if not isinstance(raw, dict):
        raise AblationError(f"{path}: not a mapping of plan keys. Fix: write task:, arms:, seeds: ...")

    def bad(key: str, why: str) -> AblationError:
        return AblationError(f"{path}: {key}: {why}")

    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise bad(unknown[0], f"not a plan key. Fix: use {', '.join(sorted(FIELDS))}")
    for key in ("task", "arms", "seeds"):
        if key not in raw:
            raise bad(key, "missing. Fix: every plan names task, arms and seeds")
    arms = raw["arms"]
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) for a in arms):
        raise bad("arms", "need a list of variant names. Fix: e.g. arms: [full, lora]")
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict) or not all(isinstance(v, int) and v >= 1 for v in fixed.values()):
        raise bad("fixed", "need arm: seeds pairs. Fix: e.g. fixed: {head_only: 3}")
    for arm in [*arms, *fixed]:
        if arm not in variant_names():
            raise bad("arms", f"unknown ablation {arm!r}. Fix: use one of {', '.join(variant_names())}")
    ints = {
        "seeds": (1, SELECTION_SEED),
        "round": (1, SELECTION_SEED),
        "extend": (0, 100),
        "selection_seeds": (1, 100),
        "steps": (1, 10**9),
    }
    for key, (lo, hi) in ints.items():
        if key in raw and not (isinstance(raw[key], int) and lo <= raw[key] <= hi):
            raise bad(key, f"{raw[key]!r} is not a whole number from {lo} to {hi}")
    lrs = raw.get("lrs")
    if lrs is not None:
        try:
            lrs = tuple(float(x) for x in lrs)
        except (TypeError, ValueError):
            raise bad("lrs", f"{lrs!r} is not a list of numbers. Fix: e.g. lrs: [1e-3, 2e-3, 4e-3]") from None
        if not lrs or any(x <= 0 for x in lrs):
            raise bad("lrs", "need positive learning rates")
    pairs = []
    for spec in raw.get("compare") or []:
        a, sep, b = str(spec).partition(":")
        if not (sep and a in [*arms, *fixed] and b in [*arms, *fixed]):
            raise bad("compare", f"{spec!r} is not A:B of two of the plan's arms. Fix: e.g. full:lora")
        pairs.append((a, b))
    margin = raw.get("margin", 1.0)
    if not isinstance(margin, (int, float)) or margin <= 0:
        raise bad("margin", f"{margin!r} is not a positive number of points")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in [*arms, *fixed]:
        raise bad("baseline", f"{baseline!r} is not one of the plan's arms")
    extra = raw.get("extra") or []
    if not isinstance(extra, list) or not all(isinstance(x, str) and x.startswith("--") for x in extra):
        raise bad("extra", "need a list of --key=value overrides")
    folder = raw.get("folder")
    if folder is not None and not (
        isinstance(folder, str) and folder and not Path(folder).is_absolute() and ".." not in Path(folder).parts
    ):
        raise bad("folder", f"{folder!r} is not a folder name under the results root. Fix: e.g. folder: stsb_low_lr")
    config = raw.get("config")
    if config is not None and not Path(config).is_file() and (CONFIGS.parent / config).is_file():
        config = str(CONFIGS.parent / config)  # relative to the checkout (or the wheel's resources)
    return Plan(
        name=path.stem,
        task=str(raw["task"]),
        arms=tuple(arms),
        seeds=raw["seeds"],
        config=config,
        round=raw.get("round", 2),
        fixed=dict(fixed),
        lrs=lrs,
        extend=raw.get("extend", DEFAULT_EXTEND),
        selection_seeds=raw.get("selection_seeds", 1),
        baseline=baseline,
        margin=float(margin),
        compare=tuple(pairs),
        extra=tuple(extra),
        steps=raw.get("steps", EMBEDDED_STEPS if is_embedded(str(raw["task"]), config) else None),
        folder=folder,
    )


def work(
    plan: Plan,
    root: Path = RESULTS,
    log: Callable[[str], None] = print,
    poll: float = POLL_S,
    deadline: float | None = None,
) -> None:
    """One worker: take the plan's runs in order until none is left; runs other workers hold are
    left to them, and waited for at the end (one of them may fail and come back to the pool).

    ``deadline`` (``time.time()`` seconds): start no run that would end after it, judging by the
    median wall time of the plan's finished runs (with none finished yet, a run starts while time
    is left); the worker then stops, its finished runs kept, and the plan goes on where it left off."""
    for arm in [*plan.arms, *plan.fixed]:
        variant_path(arm)
    log = _each_line_once(log)
    may_start = None if deadline is None else lambda: _fits(plan, root, deadline)
    repassed = False
    while True:
        waiting, started = [], time.monotonic()
        for arm, seeds in plan.targets():
            try:
                run_variant(
                    arm,
                    plan.task,
                    seeds,
                    list(plan.lrs) if plan.lrs else None,
                    plan.config,
                    plan.steps,
                    list(plan.extra),
                    root=root,
                    log=log,
                    extend=plan.extend,
                    selection_seeds=plan.selection_seeds,
                    claims=True,
                    may_start=may_start,
                )
            except Busy:
                waiting.append(arm)
            except OutOfTime as e:
                log(f"[plan {plan.name}] time is up ({e}): stopping; the plan goes on where it left off")
                return
        if not waiting:
            return
        if time.monotonic() - started > poll and not repassed:
            # a long pass (it ran something): runs it found held early on may be done by now, so
            # look again at once (quick: finished runs are skipped) before saying what is waited for
            repassed = True
            continue
        repassed = False
        if deadline is not None and time.time() + poll > deadline:
            log(f"[plan {plan.name}] time is up while other workers hold runs of {', '.join(sorted(set(waiting)))}")
            return
        log(
            f"[plan {plan.name}] other workers hold runs of {', '.join(sorted(set(waiting)))}: looking again in {poll:.0f} s"
        )
        time.sleep(poll)


def _fits(plan: Plan, root: Path, deadline: float) -> bool:
    """Whether a run started now ends before ``deadline``, by the median wall time of the plan's
    finished runs (selection and reported; any, when none has finished)."""
    left = deadline - time.time()
    folders = [root / plan.task / arm for arm in [*plan.arms, *plan.fixed]]
    walls = [w for f in folders for p in [*f.glob("seed*.json"), *f.glob("lr_sweep/*.json")] if (w := _wall_time(p))]
    return left > (statistics.median(walls) if walls else 0.0)


def _each_line_once(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` that drops a line it has already shown: every pass of a worker walks the whole plan
    again, and its "done before", "another worker runs it" and "looking again" lines would repeat
    on every pass. A run started again (its holder died) is announced again."""
    seen: set[str] = set()

    def once(line: str) -> None:
        if line not in seen or line.endswith(": running"):
            seen.add(line)
            log(line)

    return once


def status(plan: Plan, root: Path = RESULTS) -> str:
    """Per arm: selection runs and reported seeds finished (files present), runs claimed now and by
    whom; then how many reported runs are left and how long finished runs took."""
    rows = [f"plan {plan.name}: task {plan.task}, {plan.seeds} reported seeds per arm (results: {root / plan.task})"]
    rows.append(f"  {'arm':<16s} {'selection':>9s} {'reported':>9s}  running")
    left, walls, unchosen = 0, [], []
    for arm in [*plan.arms, *plan.fixed]:
        out = root / plan.task / arm
        want = plan.fixed.get(arm, plan.seeds)
        sweep = len(list((out / "lr_sweep").glob("*.json"))) if (out / "lr_sweep").is_dir() else 0
        done = [out / f"seed{k}.json" for k in range(want) if (out / f"seed{k}.json").is_file()]
        left += want - len(done)
        if arm not in plan.fixed and not done:  # a reported seed runs only once its LR is chosen
            unchosen.append(arm)
        walls += [w for w in map(_wall_time, done) if w is not None]
        running = []
        for lock in sorted(out.rglob(f"*{SUFFIX}")) if out.is_dir() else []:
            info = holder(lock) or {}
            running.append(f"{lock.name[: -len(SUFFIX)]} ({info.get('host', '?')}:{info.get('pid', '?')})")
        rows.append(f"  {arm:<16s} {sweep:>9d} {len(done):>5d}/{want:<3d}  {', '.join(running) or '-'}")
    took = f"; a finished reported run took {statistics.median(walls):.0f} s (median of {len(walls)})" if walls else ""
    select = f", and LR selection runs for {', '.join(unchosen)}" if unchosen else ""
    rows.append(f"  {left} reported runs left{select}{took}")
    return "\n".join(rows)


def _wall_time(path: Path) -> float | None:
    """A result's wall time in seconds, None when the file is not a finished result."""
    try:
        wall = json.loads(path.read_text()).get("wall_time_s")
    except (OSError, ValueError, AttributeError):
        return None
    return float(wall) if isinstance(wall, (int, float)) else None


def run_workers(name_or_path: str, workers: int, root: Path, threads: int | None, deadline: float | None = None) -> int:
    """``workers`` local worker processes of this plan, cores split between them (``threads`` each;
    default: cores // workers, at least 1), all stopping by ``deadline`` (see :func:`work`);
    returns the first failing exit status, else 0."""
    cores = os.cpu_count() or 1
    each = threads or max(1, cores // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(each), "MKL_NUM_THREADS": str(each)}
    cmd = [sys.executable, "-m", "msplora.ablation", "plan", name_or_path, "--root", str(root), "--no-report"]
    if deadline is not None:
        cmd += ["--deadline", repr(deadline)]
    # own sessions: a terminal's Ctrl-C reaches them once, through forward(), not twice
    procs = [subprocess.Popen([*cmd, "--worker-id", str(i)], env=env, start_new_session=True) for i in range(workers)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return next((c for c in codes if c != 0), 0)
