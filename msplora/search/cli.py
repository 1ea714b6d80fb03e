"""``python -m msplora.search run | worker | report`` (``make search``, ``make search-report``).

    run     --trials N --workers W [--storage S] [--study NAME] [--space FILE] -- EXTRA_FIT_ARGS
    worker  --storage URL --study NAME        # one more worker for a running study, any machine
    report  [--storage S] [--study NAME]      # summary.md, best.yaml, front/, PNGs

A user error ends as one line on stderr, ``msplora search: <problem>. Fix: <what to do>``,
exit status 2; a storage password is never printed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from msplora.config import ConfigError
from msplora.errors import ArgumentParser
from msplora.io import split_passthrough
from msplora.search.objective import (
    ENV_TRIAL_DIR,
    compose_fit_args,
    context_of,
    fit_trial,
    run_rank_child,
)
from msplora.search.report import report
from msplora.search.space import DEFAULT_SPACE, SearchError, check_sampleable, compose_fit, load_space, model_info
from msplora.search.study import (
    DEFAULT_OUT,
    DEFAULT_STORAGE,
    _scrub,
    build_sampler,
    check_storage_file,
    counts,
    create_study,
    load_study,
    open_storage,
    redact,
    space_of,
    storage_url,
)
from msplora.search.workers import ENV_STORAGE, EXIT_FAILING, RunPlan, supervise, work


def _devices_per_trial(setup) -> int:
    v = setup.config["trainer"].get("devices", 1)
    return v if isinstance(v, int) and v > 0 else 1


def cmd_run(a: argparse.Namespace, extra: list[str]) -> int:
    # Every check before the study is touched: a refused run leaves the storage as it was.
    if a.trials < 1 or a.workers < 1:
        raise SearchError("--trials and --workers must be >= 1. Fix: e.g. --trials 20 --workers 2")
    sp = load_space(a.space)
    fit_args = compose_fit_args(sp, extra)
    url = storage_url(a.storage)
    check_storage_file(url)
    name = a.study or sp.name
    setup = compose_fit(list(sp.configs), list(sp.fit_args) + list(extra))  # what every trial starts from
    info = model_info(sp.configs, [], setup)  # a model / targets that cannot work fail here
    check_sampleable(sp, info.n_layers)
    storage = open_storage(url, a.heartbeat, a.grace)
    study = create_study(storage, name, sp, fit_args, info.to_dict())
    study.set_user_attr("n_trials", a.trials)  # workers joining from other machines read N here
    print(f"study {name!r} on {redact(url)}: {counts(study)}, {a.trials} wanted", flush=True)
    plan = RunPlan(
        url=url,
        study_name=name,
        n_trials=a.trials,
        n_workers=a.workers,
        out=Path(a.out),
        heartbeat=a.heartbeat,
        grace=a.grace,
        devices_per_trial=_devices_per_trial(setup),
        fit_fn=a.fit_fn,
    )
    return supervise(study, storage, plan)


def _import(spec: str):
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def cmd_worker(a: argparse.Namespace) -> int:
    import optuna

    if os.environ.get(ENV_TRIAL_DIR) and os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        run_rank_child(Path(os.environ[ENV_TRIAL_DIR]))  # a DDP rank Lightning started inside a trial
        return 0
    url = a.storage or os.environ.get(ENV_STORAGE)
    if not url:
        raise SearchError("worker: no storage. Fix: pass --storage URL (the one `run` printed)")
    storage = open_storage(url, a.heartbeat, a.grace, must_exist=True)
    study = load_study(storage, a.study)
    if "model_info" not in study.user_attrs:
        raise SearchError(f"study {a.study!r} was not created by `run`. Fix: start it with `run` first")
    n_trials = a.trials or study.user_attrs.get("n_trials")
    seed = a.seed_offset if a.seed_offset is not None else 1000 * (a.index + 1) + len(study.get_trials(deepcopy=False))
    study.sampler = build_sampler(space_of(study), seed=seed)
    ctx = context_of(study, Path(a.out))
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    fit_fn = _import(a.fit_fn) if a.fit_fn else fit_trial
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial of our own; tracebacks to files
    try:
        brake = work(study, ctx, n_trials, fit_fn)
    except KeyboardInterrupt:
        return 130
    return EXIT_FAILING if brake.tripped else 0


def cmd_report(a: argparse.Namespace) -> int:
    import optuna

    storage = open_storage(a.storage, must_exist=True)
    name = a.study
    if name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if len(names) != 1:
            raise SearchError(f"storage {redact(storage_url(a.storage))} holds studies {names}. Fix: pass --study NAME")
        name = names[0]
    study = load_study(storage, name)
    print(report(study, Path(a.out) / name, a.top), end="")
    print(f"\nwritten under {Path(a.out) / name}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="msplora search", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument(
            "--storage",
            default=None,
            help=f"journal file (.log), .db file or SQLAlchemy URL; default {DEFAULT_STORAGE}",
        )
        q.add_argument("--out", default=str(DEFAULT_OUT), help="outputs: <out>/<study>/{trials,summary.md,...}")

    r = sub.add_parser("run", help="create the study once, run W workers until N trials are finished")
    common(r)
    r.add_argument("--trials", type=int, default=20, help="finished (complete + pruned) trials wanted")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--study", default=None, help="default: the space file's stem")
    r.add_argument("--space", default=str(DEFAULT_SPACE))
    w = sub.add_parser("worker", help="take trials of an existing study until its N are finished or taken")
    common(w)
    w.add_argument("--study", required=True)
    w.add_argument("--trials", type=int, default=None, help="default: the N the last `run` asked for")
    w.add_argument("--index", type=int, default=0, help="worker number (sampler seed, device)")
    w.add_argument("--seed-offset", type=int, default=None, help=argparse.SUPPRESS)  # set by run
    w.add_argument("--threads", type=int, default=0, help="torch threads (0: OMP_NUM_THREADS / torch default)")
    for q in (r, w):
        q.add_argument("--heartbeat", type=int, default=10, help="seconds between trial heartbeats (RDB storage)")
        q.add_argument("--grace", type=int, default=60, help="seconds without heartbeat before a trial is failed")
        q.add_argument("--fit-fn", default=None, help=argparse.SUPPRESS)  # tests: module:function replacing fit
    rep = sub.add_parser("report", help="best trials, Pareto front, plots, best config overlay")
    common(rep)
    rep.add_argument("--study", default=None, help="default: the storage's only study")
    rep.add_argument("--top", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a = p.parse_args(argv)
    if extra and a.cmd != "run":
        p.error("EXTRA fit args after -- are given to `run` only")
    try:
        if a.cmd == "run":
            return cmd_run(a, extra)
        if a.cmd == "worker":
            return cmd_worker(a)
        return cmd_report(a)
    except ConfigError as e:  # SearchError included
        message = str(e)
        url = getattr(a, "storage", None) or os.environ.get(ENV_STORAGE)
        if url:
            message = _scrub(message, url)  # a driver's message may echo the DSN
        print(f"msplora search: {message}", file=sys.stderr)
        return 2
