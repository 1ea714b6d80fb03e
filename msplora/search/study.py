"""Storage, study, sampler and pruner: everything built from a storage URL and a Space.

    storage argument            -> Optuna storage
    (default) results/search/search.log, *.log, journal:PATH
                                -> JournalStorage(JournalFileBackend): Optuna's file backend for
                                   several processes on one machine (no heartbeat in Optuna 5.0)
    *.db, sqlite:///PATH        -> RDBStorage on SQLite, transactions BEGIN IMMEDIATE, heartbeat
    any other SQLAlchemy URL    -> RDBStorage (PostgreSQL across machines), heartbeat

On RDB storages a worker's trial carries Optuna's heartbeat; a trial whose heartbeat stops for
``grace`` seconds is failed (by the next worker's ``optimize`` or by ``run``) and re-queued once
by ``RetryHeartbeatStaleTrialCallback``. On every storage, ``run`` also fails and re-queues the
trials of its own workers that died (see workers.reap_dead_workers): the only way on the journal.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path
from typing import Any

from msplora.search.space import SearchError, Space

DEFAULT_OUT = Path("results") / "search"
DEFAULT_STORAGE = DEFAULT_OUT / "search.log"
FINISHED = ("COMPLETE", "PRUNED")
LIVE = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")  # trials that hold one of the run's N slots
HOST = socket.gethostname()


def storage_url(storage: str | None) -> str:
    """``None`` -> the default journal file; ``*.log`` or ``journal:PATH`` -> journal; ``x.db`` -> sqlite."""
    s = storage or str(DEFAULT_STORAGE)
    if "://" in s or s.startswith("journal:"):
        return s
    if s.endswith((".log", ".jsonl", ".journal")):
        return f"journal:{s}"
    if s.endswith((".db", ".sqlite", ".sqlite3")):
        return f"sqlite:///{s}"
    raise SearchError(
        f"--storage {s!r}: unknown kind. Fix: give a journal file (.log / journal:PATH), a .db file "
        "or a SQLAlchemy URL (sqlite:///x.db, postgresql+psycopg2://user:pw@host/db)"
    )


def redact(url: str) -> str:
    """The URL as it may be printed: any password replaced by ``***``."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url.split("://", 1)[0] + "://***"  # unparsable: print nothing after the scheme


def _scrub(text: str, url: str) -> str:
    """Remove the URL's password from a driver's message (some drivers echo the DSN)."""
    from sqlalchemy.engine import make_url

    try:
        pw = make_url(url).password
    except Exception:
        pw = None
    text = text.replace(url, redact(url))
    return text.replace(pw, "***") if pw else text


def storage_file(url: str) -> Path | None:
    """The local file of a journal or SQLite storage URL; None for a database server's URL."""
    for prefix in ("journal:", "sqlite:///"):
        if url.startswith(prefix):
            return Path(url[len(prefix) :]).expanduser()
    return None


def check_storage_file(url: str, must_exist: bool = False) -> None:
    """Refuse, before anything is written, a storage file that cannot be one: a folder, a path
    under a file, or (``must_exist``: ``report`` and ``worker`` read a study that ``run`` made)
    a file that is not there. ``run`` creates a missing file and its missing folders."""
    path = storage_file(url)
    if path is None:
        return
    shown = redact(url)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise SearchError(
                f"--storage {shown}: {parent} is a file, not a folder. Fix: put the storage file in a folder "
                "(e.g. results/search/search.log)"
            )
    if path.is_dir():
        raise SearchError(f"--storage {shown}: {path} is a folder. Fix: name a file in it, e.g. {path / 'search.log'}")
    if must_exist and not path.is_file():
        raise SearchError(
            f"--storage {shown}: no such file {path}. Fix: check the path, or create the study first with "
            "`msplora search run --storage ...`"
        )


def open_storage(storage: str | None, heartbeat: int | None = None, grace: int | None = None, must_exist: bool = False):
    """An Optuna storage for the argument; on RDB with ``heartbeat`` set, stale trials are
    failed after ``grace`` seconds and re-queued once. A storage file and its folders are
    created when missing, unless ``must_exist`` (then a missing file is a ``SearchError``)."""
    import optuna

    url = storage_url(storage)
    check_storage_file(url, must_exist)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = storage_file(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        storage_file(url).parent.mkdir(parents=True, exist_ok=True)
        # timeout: a worker waits for another's write instead of failing at once.
        # isolation_level=None: pysqlite emits no BEGIN of its own; _begin_immediate does.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60, "isolation_level": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            kwargs.update(
                heartbeat_interval=heartbeat,
                grace_period=grace or 3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        try:
            rdb = optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # bad URL, server down, missing driver
            first = _scrub(str(e).splitlines()[0] if str(e) else "", url)[:300]
            raise SearchError(
                f"--storage {redact(url)}: cannot open ({type(e).__name__}: {first}). "
                "Fix: check the URL, the password and that the database server is running"
            ) from None
    if sqlite:
        _begin_immediate(rdb.engine)
    return rdb


def _begin_immediate(engine) -> None:
    """Every SQLite transaction takes the write lock when it begins.

    Optuna takes a queued (WAITING) trial by reading its state, then writing RUNNING; PostgreSQL
    makes that atomic with SELECT ... FOR UPDATE, SQLite has no row locks, so two processes on
    a deferred transaction could both read WAITING and both run the trial. BEGIN IMMEDIATE (the
    SQLAlchemy pysqlite recipe for serializable transactions) makes the read and the write one
    step. ``RDBStorage.engine`` is the storage's public SQLAlchemy engine; listeners added after
    construction apply to every later transaction.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def has_heartbeat(storage) -> bool:
    """RDBStorage built with a heartbeat interval (Optuna 5.0's journal storage has none)."""
    get = getattr(storage, "get_heartbeat_interval", None)
    return get is not None and get() is not None


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


def create_study(storage, name: str, sp: Space, fit_args: list[str], info: dict | None = None):
    """Create the study once (or load it) and check it was made with the same space and fit args.

    Checks first, writes after: a refused study is left as it was."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, directions=sp.directions, load_if_exists=True)
    attrs = study.user_attrs
    mine = {"space": sp.to_dict(), "fit_args": fit_args}
    if "space" in attrs:
        theirs = {**attrs["space"], "enqueue": attrs["space"].get("enqueue", [])}  # older studies lack it
        if [d.name.lower() for d in study.directions] != sp.directions or theirs != mine["space"]:
            raise SearchError(
                f"study {name!r} exists with another space or objective. "
                "Fix: pass a new --study name, or rerun with the same --space"
            )
        if attrs["fit_args"] != fit_args:
            raise SearchError(
                f"study {name!r} exists with other fit args ({attrs['fit_args'][-3:]} ...). "
                "Fix: pass a new --study name, or rerun with the same EXTRA args after --"
            )
    else:
        for k, v in mine.items():
            study.set_user_attr(k, v)
        for params in sp.enqueue:  # seeded points: taken before any sampled trial
            study.enqueue_trial(params, user_attrs={"enqueued": True}, skip_if_exists=True)
    if info is not None and attrs.get("model_info") != info:
        study.set_user_attr("model_info", info)
    return study


def load_study(storage, name: str, seed: int | None = None):
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SearchError(
            f"study {name!r} not found (storage has {names}). Fix: pass --study, or `run` first"
        ) from None
    if "space" not in study.user_attrs:
        return study
    sp = Space.from_dict({"enqueue": [], **study.user_attrs["space"]})
    return optuna.load_study(study_name=name, storage=storage, sampler=build_sampler(sp, seed), pruner=build_pruner(sp))


def space_of(study) -> Space:
    return Space.from_dict({"enqueue": [], **study.user_attrs["space"]})


def is_surplus(t) -> bool:
    return bool(t.user_attrs.get("surplus"))


def counts(study) -> dict[str, int]:
    """Trials by state; SURPLUS: trials started past the study's N and closed untrained (see objective)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = "SURPLUS" if t.state.name == "FAIL" and is_surplus(t) else t.state.name
        out[key] = out.get(key, 0) + 1
    return out


def n_finished(c: dict[str, int]) -> int:
    return sum(c.get(s, 0) for s in FINISHED)


def fail_stale(study) -> None:
    """Optuna's own stale-trial check (RDB heartbeat); its callback re-queues each once."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
