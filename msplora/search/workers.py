"""Workers (Optuna's distributed pattern) and the ``run`` supervisor that starts them.

    run: check space + model -> create study (N in its user attrs, seeded points enqueued)
         loop until N trials are COMPLETE or PRUNED:
             fail + re-queue trials of dead workers (this host: pid gone; RDB: stale heartbeat)
             start W workers ---------------------------------------------.
             wait; a worker that exits "failing" ends the run with exit 2  |
                                                                           v
    worker: study.optimize(objective, catch=(Exception,), callbacks=[MaxTrialsCallback, brake])
            ask() takes a queued trial (retry, seeded point) before sampling a new one; the
            storage beats the trial's heartbeat (RDB); the objective closes a trial past the
            N-th as SURPLUS (two workers asked at once), so the study holds exactly N.

Any machine can join with ``python -m msplora.search worker --storage URL --study NAME``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from msplora.search.objective import FitFn, TrialContext, fit_trial, make_objective
from msplora.search.space import SearchError
from msplora.search.study import HOST, LIVE, counts, fail_stale, has_heartbeat, is_surplus, n_finished

EXIT_FAILING = 3  # a worker's exit status when its trials keep failing (or one fails fatally)
ENV_STORAGE = "MSPLORA_SEARCH_STORAGE"  # the storage URL for workers: never on a command line (password)


# -- one worker -------------------------------------------------------------------------------------------
@dataclass
class Brake:
    """Stops the worker after ``limit`` failed trials in a row, or one fatal (SearchError) failure."""

    limit: int = 3
    in_a_row: int = 0
    tripped: bool = False
    failed: list[int] = field(default_factory=list)

    def __call__(self, study, trial) -> None:
        state = trial.state.name
        if state != "FAIL" or is_surplus(trial):
            self.in_a_row = 0 if state in ("COMPLETE", "PRUNED") else self.in_a_row
            return
        self.failed.append(trial.number)
        self.in_a_row += 1
        if trial.user_attrs.get("fatal") or self.in_a_row >= self.limit:
            self.tripped = True
            study.stop()


def _log_trial(study, trial) -> None:
    """One line per trial on stdout (tracebacks go to trials/NNNN/error.txt)."""
    tag = f"[worker {os.getpid()}] trial {trial.number}"
    if is_surplus(trial):
        print(f"{tag} not run: the study's trials are all taken", flush=True)
    elif trial.state.name == "FAIL":
        print(f"{tag} failed: {trial.user_attrs.get('error', 'interrupted')}", flush=True)
    else:
        print(f"{tag} {trial.state.name.lower()}: {trial.values}", flush=True)


def work(study, ctx: TrialContext, n_trials: int, fit_fn: FitFn = fit_trial, max_failures: int = 3) -> Brake:
    """Run trials until the study's ``n_trials`` are finished or taken; returns the brake (tripped?)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    brake = Brake(max_failures)
    c = counts(study)
    if n_finished(c) + c.get("RUNNING", 0) >= n_trials and not c.get("WAITING"):
        return brake  # nothing left to take: asking would only make a surplus trial
    # RUNNING counts: a worker stops once every slot is finished or being worked on.
    total = MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(make_objective(ctx, fit_fn, n_trials), catch=(Exception,), callbacks=[total, brake, _log_trial])
    return brake


# -- dead workers -----------------------------------------------------------------------------------------
def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid recorded: not ours to judge
    return True


def reap_dead_workers(study) -> list[tuple[int, int | None]]:
    """Fail the RUNNING trials whose worker ran on this host and is gone, and re-queue each once
    (Optuna's RetryHeartbeatStaleTrialCallback, as for a stale heartbeat). Returns
    ``(failed trial, retry trial or None)`` pairs. The journal storage has no heartbeat, so on
    it this is how a dead worker's trial is found; a worker on another machine is found by the
    heartbeat (RDB) only."""
    import optuna
    from optuna.trial import TrialState

    out: list[tuple[int, int | None]] = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker_host") != HOST or _alive(t.user_attrs.get("worker_pid")):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first (and re-queued it)
        before = len(study.get_trials(deepcopy=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, t)
        after = study.get_trials(deepcopy=False)
        out.append((t.number, after[-1].number if len(after) > before else None))
    return out


# -- devices ----------------------------------------------------------------------------------------------
def worker_devices(index: int, n_gpus: int, per_trial: int = 1) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for worker ``index``: its own ``per_trial`` GPUs (round robin), or None."""
    if n_gpus <= 0:
        return None
    per_trial = max(1, min(per_trial, n_gpus))
    slots = max(1, n_gpus // per_trial)
    first = (index % slots) * per_trial
    return ",".join(str(first + i) for i in range(per_trial))


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


# -- the supervisor ---------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    url: str
    study_name: str
    n_trials: int
    n_workers: int
    out: Path
    heartbeat: int
    grace: int
    devices_per_trial: int = 1
    fit_fn: str | None = None  # tests: module:function replacing fit_trial


def _first_failure(study, since: int):
    """The earliest trial numbered >= since that failed with an error, or None."""
    fails = [t for t in study.get_trials(deepcopy=False) if t.number >= since and "error" in t.user_attrs]
    return min(fails, key=lambda t: t.number) if fails else None


def supervise(study, storage, plan: RunPlan) -> int:
    """Start workers until the study holds ``n_trials`` finished trials; returns the exit status."""
    since = len(study.get_trials(deepcopy=False))
    threads = max(1, (os.cpu_count() or 1) // plan.n_workers)
    n_gpus = _gpu_count()
    procs: list[subprocess.Popen] = []
    stopping: list[float] = []
    idle_rounds = 0
    waiting_told = False

    def stop_workers(*_):
        # SIGINT: a KeyboardInterrupt ends the fit at once (a SIGTERM only at the next batch end) and
        # Optuna marks the trial FAIL (a rerun replaces it). A second signal kills.
        sig = signal.SIGKILL if stopping else signal.SIGINT
        stopping.append(time.time())
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)

    signal.signal(signal.SIGTERM, stop_workers)
    signal.signal(signal.SIGINT, stop_workers)
    t0 = time.time()
    while True:
        for failed, retry in reap_dead_workers(study):
            print(f"trial {failed}: its worker died; failed, retried as trial {retry}", flush=True)
        if has_heartbeat(storage):
            fail_stale(study)
        c = counts(study)
        done = n_finished(c)
        if done >= plan.n_trials:
            break
        todo = c.get("WAITING", 0) + max(0, plan.n_trials - sum(c.get(s, 0) for s in LIVE))
        if todo == 0:  # every slot is RUNNING under a worker this run did not start
            running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
            owners = sorted(
                {f"{t.user_attrs.get('worker_host', '?')}:{t.user_attrs.get('worker_pid', '?')}" for t in running}
            )
            if not has_heartbeat(storage):
                raise SearchError(
                    f"trials {[t.number for t in running]} are RUNNING under other workers ({', '.join(owners)}) and "
                    "the journal storage has no heartbeat to tell a live worker from a dead one on another host. "
                    "Fix: let those workers finish, then rerun; or use SQLite / PostgreSQL storage (heartbeat)"
                )
            if not waiting_told:
                print(f"waiting for trials {[t.number for t in running]} of workers {owners} (heartbeat)", flush=True)
                waiting_told = True
            time.sleep(min(plan.heartbeat, 5))
            continue
        filled = len(study.get_trials(deepcopy=False)) + todo - c.get("WAITING", 0)  # once free slots are taken
        procs = [_start_worker(plan, i, filled, threads, n_gpus) for i in range(min(plan.n_workers, todo))]
        while any(p.poll() is None for p in procs):
            time.sleep(0.3)
            if stopping and time.time() - stopping[0] > 30:
                stop_workers()
        rcs = [p.wait() for p in procs]
        if stopping:
            print(f"stopped; {counts(study)}. Rerun the same command to continue.", file=sys.stderr)
            return 130
        if EXIT_FAILING in rcs:
            first = _first_failure(study, since)
            if first is not None and first.user_attrs.get("fatal"):  # a SearchError: its own "problem. Fix: ..."
                raise SearchError(first.user_attrs["error"].split(": ", 1)[1])
            error = f"trial {first.number}: {first.user_attrs['error']}" if first else "no error recorded"
            raise SearchError(
                f"trials keep failing ({counts(study).get('FAIL', 0)} failed), the first {error}. "
                f"Fix: read its traceback in {plan.out / plan.study_name}/trials/, or run one fit by hand"
            )
        for p, rc in zip(procs, rcs):
            if rc != 0:
                how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
                print(f"worker pid {p.pid} ended with {how}", file=sys.stderr, flush=True)
        idle_rounds = idle_rounds + 1 if n_finished(counts(study)) == done else 0
        if idle_rounds >= 3:
            first = _first_failure(study, since)
            error = f"; trial {first.number}: {first.user_attrs['error']}" if first else ""
            raise SearchError(
                f"3 rounds of workers finished no trial (exit statuses {rcs}{error}). "
                "Fix: read the workers' messages above"
            )
    print(f"study {plan.study_name!r}: {counts(study)} in {time.time() - t0:.0f} s", flush=True)
    return 0


def _start_worker(plan: RunPlan, index: int, filled: int, threads: int, n_gpus: int) -> subprocess.Popen:
    env = {**os.environ, ENV_STORAGE: plan.url, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    dev = worker_devices(index, n_gpus, plan.devices_per_trial)
    if dev is not None:
        env["CUDA_VISIBLE_DEVICES"] = dev
    # Workers differ in sampler seed (else they would propose the same configs), and so do restarts:
    # 1000 x (index + 1) + the trial count once this round's slots are filled (as before the move
    # to optimize(), when the run queued them first), so a seeded study samples the same points.
    cmd = [
        sys.executable,
        "-m",
        "msplora.search",
        "worker",
        "--study",
        plan.study_name,
        "--out",
        str(plan.out),
        "--index",
        str(index),
        "--seed-offset",
        str(1000 * (index + 1) + filled),
        "--trials",
        str(plan.n_trials),
        "--heartbeat",
        str(plan.heartbeat),
        "--grace",
        str(plan.grace),
    ] + (["--fit-fn", plan.fit_fn] if plan.fit_fn else [])
    return subprocess.Popen(cmd, env=env, start_new_session=True)
