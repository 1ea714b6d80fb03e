"""Optuna search: sampling, storages, workers on study.optimize (exact N, no duplicate, dead
workers retried), errors, DDP trial, report and importances."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from msplora import MSPLoRAConfig
from msplora.pyramid import group_sizes
from msplora.search import (
    ModelInfo,
    SearchError,
    TrialContext,
    adapter_params,
    counts,
    create_study,
    load_space,
    make_objective,
    mid_choices,
    model_info,
    open_storage,
    overlay_of,
    param_importances,
    redact,
    report,
    sample_levels,
    sample_options,
    storage_url,
    work,
    worker_devices,
)
from msplora.training.run import RunResult
from tests.conftest import REPO

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = REPO / "configs" / "search" / "default.yaml"


def _check_levels(levels: list[dict], n_layers: int) -> None:
    ranks = [lv["rank"] for lv in levels]
    assert ranks == sorted(ranks, reverse=True) and min(ranks) >= 1  # non-increasing coarse -> fine
    cells = []
    for lv in levels:
        if lv["share"] == "group":
            sizes = group_sizes(n_layers, lv.get("groups"), lv.get("group_size"))
            assert sum(sizes) == n_layers and 1 < len(sizes) < n_layers
            cells.append(len(sizes))
        else:
            cells.append(1 if lv["share"] == "global" else n_layers)
    assert cells == sorted(cells) and len(set(cells)) == len(cells)  # coarse -> fine, no repeated level
    MSPLoRAConfig(levels=levels)  # the config class accepts it


@pytest.mark.parametrize("n_layers", [2, 3, 4, 6, 12, 24])
@pytest.mark.parametrize("by", ["groups", "group_size"])
def test_sampled_pyramids_are_valid_for_the_layer_count(n_layers, by):
    space = load_space(SPACE).space | {"grouping": {"by": by, "choices": [2, 3, 4, 6]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=n_layers))
    seen = set()
    for _ in range(80):
        trial = study.ask()
        levels, lr = sample_levels(trial, space, n_layers)
        _check_levels(levels, n_layers)
        assert space["lr"]["low"] <= lr <= space["lr"]["high"]
        seen.add(len(levels))
        study.tell(trial, 0.0)
    # exactly the level counts the layer count allows (L=2 has no room for a mid level)
    allowed = {n for n in (1, 2, 3, 4) if n <= 2 or mid_choices(n_layers, space["grouping"], n - 2)}
    assert seen == allowed and (n_layers < 6 or 4 in allowed) and (n_layers > 2 or allowed == {1, 2})


def test_fixed_trial_gives_the_stated_pyramid():
    space = load_space(SPACE).space
    trial = optuna.trial.FixedTrial({"n_levels": 4, "r0": 16, "decay": 0.5, "mid_groups_4": "2-3", "lr": 1e-3})
    levels, lr = sample_levels(trial, space, 6)
    assert [(lv["share"], lv["rank"], lv.get("groups")) for lv in levels] == [
        ("global", 16, None),
        ("group", 8, 2),
        ("group", 4, 3),
        ("layer", 2, None),
    ]
    assert mid_choices(6, {"by": "groups", "choices": [1, 2, 3, 6, 9]}, 1) == ["2", "3"]  # 1, 6, 9 degenerate
    assert mid_choices(4, {"by": "group_size", "choices": [2, 3, 4]}, 2) == []  # both give 2 cells


def test_scale_and_lr_options_are_sampled_into_a_valid_pyramid():
    from msplora.pyramid import level_scale

    space = load_space(SPACE).space | {
        "scale_rule": ["lora", "rslora", "constant"],
        "scale": [1.0, 2.0, 4.0],
        "lr_scale": {"low": 0.25, "high": 4.0, "log": True},
        "lr_rule": ["none", "layers", "sqrt_layers"],
        "lr_ratio_B": [1.0, 4.0],
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rules, ratios = set(), set()
    for _ in range(60):
        trial = study.ask()
        levels, _ = sample_levels(trial, space, 6)
        pyramid = sample_options(trial, space, levels)
        cfg = MSPLoRAConfig(**pyramid)  # the overlay's pyramid is a valid config
        rule = trial.params.get("scale_rule", "lora")
        rules.add(rule)
        ratios.add(cfg.lr_ratio_B)
        # the coarsest level gets the sampled scale s_0 whatever the rule (rules compared at one magnitude)
        lv0 = cfg.levels[0]
        assert level_scale(rule, lv0.alpha, lv0.rank) == pytest.approx(trial.params["scale"])
        if len(levels) > 1:  # the first level trains at lr; the others at their sampled multiplier
            assert cfg.levels[0].lr_scale == 1.0
            assert [lv.lr_scale for lv in cfg.levels[1:]] == pytest.approx(
                [trial.params[f"lr_scale_{k}"] for k in range(1, len(levels))]
            )
        study.tell(trial, 0.0)
    assert rules == {"lora", "rslora", "constant"} and ratios == {1.0, 4.0}


def test_a_space_without_options_samples_the_same_overlays_as_before():
    space = load_space(SPACE).space
    trial = optuna.trial.FixedTrial({"n_levels": 3, "r0": 8, "decay": 0.5, "mid_groups_3": "3", "lr": 1e-3})
    levels, lr = sample_levels(trial, space, 6)
    assert sample_options(trial, space, levels) == {"levels": levels}  # no option keys, alphas untouched
    assert overlay_of(levels, lr, sample_options(trial, space, levels)) == overlay_of(levels, lr)


def test_bad_option_spaces_are_refused(tmp_path):
    for change, needle in [
        ({"scale_rule": ["banana"]}, "scale_rule"),
        ({"lr_scale": {"low": 2.0, "high": 1.0}}, "lr_scale"),
        ({"lr_ratio_B": [0.0, 1.0]}, "lr_ratio_B"),
        ({"lr_rule": []}, "lr_rule"),
    ]:
        bad = tmp_path / "bad.yaml"
        doc = yaml.safe_load(SPACE.read_text())
        doc["space"].update(change)
        bad.write_text(yaml.safe_dump(doc))
        with pytest.raises(SearchError, match=f"{needle}.*Fix"):
            load_space(bad)


def test_bad_space_and_storage_fail_with_clear_messages(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({**yaml.safe_load(SPACE.read_text()), "space": {"r0": [8], "n_levels": [3], "decay": [1.5]}})
    )
    with pytest.raises(SearchError, match="decay.*Fix"):
        load_space(bad)
    with pytest.raises(SearchError, match="no such file"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(SearchError, match="unknown kind"):
        storage_url("results/x.txt")
    assert storage_url("a/b.log") == "journal:a/b.log" and storage_url("a.db") == "sqlite:///a.db"
    proc = subprocess.run(
        [sys.executable, "-m", "msplora.search", "run", "--space", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "space.decay" in proc.stderr and "Traceback" not in proc.stderr


def test_worker_devices_are_disjoint():
    assert worker_devices(0, 0) is None
    assert [worker_devices(i, 4) for i in range(4)] == ["0", "1", "2", "3"]
    assert [worker_devices(i, 4, per_trial=2) for i in range(3)] == ["0,1", "2,3", "0,1"]


# -- cheap objective: no training ------------------------------------------------------------------
def fake_fit(trial, overlay, root, ctx):
    """Stands in for a fit: a value from the ranks, after FAKE_FIT_SLEEP seconds. With
    FAKE_FIT_LOG set, appends "pid number" per call (O_APPEND: lines from processes never mix)."""
    if os.environ.get("FAKE_FIT_LOG"):
        with open(os.environ["FAKE_FIT_LOG"], "a") as f:
            f.write(f"{os.getpid()} {trial.number}\n")
    time.sleep(float(os.environ.get("FAKE_FIT_SLEEP", "0")))
    ranks = [lv["rank"] for lv in overlay["model"]["pyramid"]["levels"]]
    n = adapter_params(overlay["model"]["pyramid"]["levels"], ctx.info)
    return RunResult(value=0.5 + 0.01 * sum(ranks) / (1 + len(ranks)), trainable_params=n + 770, monitor="val/accuracy")


def failing_fit(trial, overlay, root, ctx):
    raise ValueError(f"boom in trial {trial.number}")


def _space(tmp_path: Path, **change) -> Path:
    raw = yaml.safe_load(SPACE.read_text())
    raw["configs"] = [str(REPO / c) for c in raw["configs"]]
    raw.update(change)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tiny_fit(model_dir: Path, *extra: str) -> list[str]:
    """Fit overrides for a real trial on the tiny BERT: 64 training rows in batches of 16."""
    return [
        f"--model.model={model_dir}",
        "--data.init_args.max_train_samples=64",
        "--data.init_args.max_eval_samples=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_length=32",
        *extra,
    ]


def _run(tmp_path, storage, *args, env=None, popen=False, study="s", extra=()):
    cmd = [
        sys.executable,
        "-m",
        "msplora.search",
        "run",
        "--storage",
        storage,
        "--study",
        study,
        "--out",
        str(tmp_path / "out"),
        *args,
        "--",
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    if popen:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _open(storage: str):
    """The study as a reader sees it, for any storage argument the CLI takes."""
    return optuna.load_study(study_name="s", storage=open_storage(storage))


def _assert_exact(study, n: int) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # the only FAIL trials a clean run may hold are surplus ones (closed untrained, never fitted)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name == "FAIL")


def _one_error_line(stderr: str) -> str:
    """The CLI's last stderr line, checked for the house shape."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("msplora search: ") and ". Fix: " in last and "Traceback" not in stderr, stderr[-2000:]
    return last


def test_model_info_finds_the_targets_inject_wraps(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    import msplora

    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"model": str(tiny_bert_dir), "pyramid": {"targets": ["query", "value"]}}}))
    base = str(REPO / "configs" / "base.yaml")
    info = model_info([base, str(cfg)], [])
    model = msplora.inject(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), MSPLoRAConfig(targets=["query", "value"])
    )
    kinds = msplora.get_bank(model).kinds
    assert info.shapes == {k: (kb.d_in, kb.d_out) for k, kb in kinds.items()}
    assert info.n_layers == len(kinds["query"].layer_ids)
    with pytest.raises(SearchError, match=r"matches no module.*Fix"):
        model_info([base, str(cfg)], ["--model.pyramid.targets=[nope]"])


ASK_SCRIPT = """
import json, sys
import optuna
from msplora.search import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="s", storage=open_storage(sys.argv[1]))
taken = []
while True:
    trial = study.ask()  # takes a queued trial, or makes a new one when the queue is empty
    if "queued" not in trial.user_attrs:  # a new trial: the queue is empty
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        break
    taken.append(trial.user_attrs["queued"])
    study.tell(trial, 0.0)
json.dump(taken, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_four_processes_asking_one_sqlite_queue_never_take_a_trial_twice(tmp_path):
    """SQLite has no SELECT ... FOR UPDATE: with deferred transactions, 4 processes popping 80
    queued trials took 98 (18 twice) when the old file-lock test was written. Our SQLite storage
    begins every transaction IMMEDIATE, so each queued trial is taken exactly once."""
    db = str(tmp_path / "q.db")
    study = optuna.create_study(study_name="s", storage=open_storage(db))
    for i in range(80):
        study.enqueue_trial({"x": i}, user_attrs={"queued": i})
    script = tmp_path / "ask.py"
    script.write_text(ASK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, str(script), db, str(tmp_path / f"w{k}.json")], cwd=REPO, env=env)
        for k in range(4)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    taken = [t for k in range(4) for t in json.loads((tmp_path / f"w{k}.json").read_text())]
    assert sorted(taken) == list(range(80))  # each queued trial once: none twice, none lost
    assert sum(t.state.name == "COMPLETE" for t in study.get_trials()) == 80


def _pg_url() -> str:
    url = os.environ.get("MSPLORA_PG_URL")
    if not url:
        pytest.skip("MSPLORA_PG_URL unset: run `source .ci/postgres.sh` (done by .ci/run)")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as e:
        pytest.skip(f"PostgreSQL at {redact(url)} unreachable ({type(e).__name__}); start it with .ci/postgres.sh")
    return url


SEEDED = [{"n_levels": 3, "r0": 8, "decay": 0.5, "mid_groups_3": "3"}, {"n_levels": 1, "r0": 4}]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_four_workers_forty_trials_exact_on_every_storage(tmp_path, kind):
    """4 workers x 40 trials of a fake objective: exactly 40 finished, each fitted once, the
    seeded points taken first, on the journal file, SQLite and PostgreSQL."""
    study_name = "s"
    if kind == "journal":
        storage = str(tmp_path / "study.log")
    elif kind == "sqlite":
        storage = f"sqlite:///{tmp_path / 'study.db'}"
    else:
        storage = _pg_url()
        study_name = f"pytest-{os.getpid()}-{time.time_ns()}"
    log = tmp_path / "fits.txt"
    space = _space(tmp_path, enqueue=SEEDED)
    args = ("--trials", "40", "--workers", "4", "--space", str(space), "--fit-fn", "tests.test_search:fake_fit")
    t0 = time.time()
    proc = _run(tmp_path, storage, *args, study=study_name, env={"FAKE_FIT_SLEEP": "0.2", "FAKE_FIT_LOG": str(log)})
    took = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    try:
        _assert_exact(study, 40)
        fits = [line.split() for line in log.read_text().splitlines()]
        numbers = [int(n) for _, n in fits]
        assert len(numbers) == len(set(numbers)) == 40  # no trial fitted twice, none lost
        assert sorted(numbers) == sorted(t.number for t in study.trials if t.state.name == "COMPLETE")
        assert len({pid for pid, _ in fits}) >= 2  # the workers really shared the study
        by_number = {t.number: t for t in study.trials}
        for i, seed in enumerate(SEEDED):  # enqueued at creation: trials 0 and 1, with their params
            assert {k: by_number[i].params[k] for k in seed} == seed
        assert study.metric_names == ["val/accuracy", "trainable params"]
        print(f"{kind}: 40 trials x 4 workers in {took:.1f} s, {len(study.trials) - 40} surplus")
    finally:
        if kind == "postgres":
            optuna.delete_study(study_name=study_name, storage=storage)


@pytest.mark.slow
def test_rerun_adds_nothing_and_another_space_is_refused(tmp_path):
    storage = str(tmp_path / "study.log")
    search = (
        "--trials",
        "3",
        "--workers",
        "1",
        "--space",
        str(_space(tmp_path)),
        "--fit-fn",
        "tests.test_search:fake_fit",
    )
    assert _run(tmp_path, storage, *search).returncode == 0
    before = Path(storage).read_bytes()
    again = _run(tmp_path, storage, *search)
    assert again.returncode == 0 and len(_open(storage).trials) == 3
    other = _run(tmp_path, storage, "--trials", "3", "--space", str(_space(tmp_path, objective="single")))
    assert other.returncode == 2 and "another space" in _one_error_line(other.stderr)
    assert len(_open(storage).trials) == 3 and Path(storage).read_bytes()[: len(before)] == before


def _wait_for_running(storage: str, proc, n_complete: int):
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            trials = _open(storage).get_trials()
        except KeyError:  # not created yet
            continue
        if sum(t.state.name == "COMPLETE" for t in trials) >= n_complete:
            # "overlay" is set once every parameter is sampled: a kill before that would leave a
            # trial with only some params, whose retry rightly samples the rest anew.
            running = [t for t in trials if t.state.name == "RUNNING" and "overlay" in t.user_attrs]
            if running:
                return running[0]
    proc.kill()
    raise AssertionError(proc.communicate()[0][-3000:])


def _assert_retried_once(study, killed: int, before: dict) -> None:
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state.name == "FAIL"
    assert all(trials[n].values == v for n, v in before.items())  # completed trials untouched
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == trials[killed].params  # the retry trains the same config


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried_in_the_same_run_on_journal(tmp_path):
    """The journal has no heartbeat: `run` sees its worker die, fails that trial by the dead pid
    and re-queues it once; the run still ends with all trials complete and exit 0."""
    storage = str(tmp_path / "study.log")
    args = (
        "--trials",
        "5",
        "--workers",
        "1",
        "--space",
        str(_space(tmp_path)),
        "--fit-fn",
        "tests.test_search:fake_fit",
    )
    proc = _run(tmp_path, storage, *args, env={"FAKE_FIT_SLEEP": "1.0"}, popen=True)
    running = _wait_for_running(storage, proc, 2)
    before = {t.number: t.values for t in _open(storage).get_trials() if t.state.name == "COMPLETE"}
    os.kill(running.user_attrs["worker_pid"], signal.SIGKILL)  # the worker dies mid-trial
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"trial {running.number}: its worker died" in out and "signal 9" in out
    study = _open(storage)
    _assert_retried_once(study, running.number, before)
    _assert_exact_after_kill(study, 5, running.number)


def _assert_exact_after_kill(study, n: int, killed: int) -> None:
    done = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == n and not [t for t in study.get_trials() if t.state.name in ("RUNNING", "WAITING")]
    failed = [t.number for t in study.get_trials() if t.state.name == "FAIL" and not t.user_attrs.get("surplus")]
    assert failed == [killed]


@pytest.mark.slow
def test_killed_run_trial_goes_stale_and_is_retried_on_rerun_sqlite(tmp_path):
    """The whole run (supervisor and worker) is SIGKILLed: nobody saw the worker die. The rerun
    fails the orphaned trial and re-queues it once."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = (
        *("--trials", "5", "--workers", "1", "--space", str(_space(tmp_path))),
        *("--fit-fn", "tests.test_search:fake_fit", "--heartbeat", "1", "--grace", "3"),
    )
    proc = _run(tmp_path, storage, *args, env={"FAKE_FIT_SLEEP": "1.0"}, popen=True)
    running = _wait_for_running(storage, proc, 2)
    before = {t.number: t.values for t in _open(storage).get_trials() if t.state.name == "COMPLETE"}
    os.killpg(proc.pid, signal.SIGKILL)
    os.killpg(running.user_attrs["worker_pid"], signal.SIGKILL)
    proc.wait(timeout=30)
    # The rerun finds the trial by its dead pid (same host) or by its stale heartbeat, whichever
    # looks first; either way it must be failed and re-queued exactly once.
    rerun = _run(tmp_path, storage, *args, env={"FAKE_FIT_SLEEP": "0.2"})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    study = _open(storage)
    _assert_retried_once(study, running.number, before)
    _assert_exact_after_kill(study, 5, running.number)


# -- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, problem",
    [
        ({"lr": {"low": 5.0e-3, "high": 5.0e-4, "log": True}}, "space.lr: low 0.005 > high 0.0005"),
        ({"r0": []}, "space.r0"),
        ({"decay": []}, "space.decay: an empty choice list"),
        ({"alpha": []}, "space.alpha: an empty choice list"),
        ({"grouping": {"by": "groups", "choices": []}}, "space.grouping"),
    ],
)
def test_unsampleable_space_is_refused_before_any_trial(tmp_path, change, problem):
    raw = yaml.safe_load(SPACE.read_text())
    space = _space(tmp_path, space={**raw["space"], **change})
    storage = tmp_path / "study.log"
    t0 = time.time()
    proc = _run(
        tmp_path, str(storage), "--trials", "1", "--space", str(space), "--fit-fn", "tests.test_search:fake_fit"
    )
    assert proc.returncode == 2 and problem in _one_error_line(proc.stderr)
    assert not storage.exists() and not (tmp_path / "out").exists()  # refused before the study existed
    assert time.time() - t0 < 60  # (was: minutes of failing trials until killed)


def test_seeded_point_outside_the_space_is_refused(tmp_path):
    space = _space(tmp_path, enqueue=[{"n_levels": 3, "mid_groups_3": 3}])  # choices are strings: "3"
    proc = _run(tmp_path, str(tmp_path / "study.log"), "--trials", "1", "--space", str(space))
    assert proc.returncode == 2 and "enqueue[0]" in _one_error_line(proc.stderr)
    assert not (tmp_path / "study.log").exists()


def test_space_no_level_count_fits_the_model_is_refused(tmp_path):
    raw = yaml.safe_load(SPACE.read_text())
    # MiniLM has 6 layers: 3 levels need a mid grouping with 1 < groups < 6; 6 and 9 give none
    space = _space(tmp_path, space={**raw["space"], "n_levels": [3], "grouping": {"by": "groups", "choices": [6, 9]}})
    proc = _run(tmp_path, str(tmp_path / "study.log"), "--trials", "1", "--space", str(space))
    assert proc.returncode == 2 and "no valid shape for 6 layers" in _one_error_line(proc.stderr)
    assert not (tmp_path / "study.log").exists()


@pytest.mark.slow
def test_trials_that_keep_failing_stop_the_run_with_the_first_error(tmp_path):
    storage = str(tmp_path / "study.log")
    args = (
        "--trials",
        "20",
        "--workers",
        "1",
        "--space",
        str(_space(tmp_path)),
        "--fit-fn",
        "tests.test_search:failing_fit",
    )
    proc = _run(tmp_path, storage, *args)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and "trials keep failing" in line and "trial 0: ValueError: boom in trial 0" in line
    trials = _open(storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] * 3  # stopped after 3 in a row, not 29
    assert "boom in trial 0" in (tmp_path / "out" / "s" / "trials" / "0000" / "error.txt").read_text()


def test_storage_password_never_printed(tmp_path):
    url = "postgresql+psycopg2://msplora:s3cr3t-pw@127.0.0.1:1/nodb"  # port 1: refused at once
    assert redact(url) == "postgresql+psycopg2://msplora:***@127.0.0.1:1/nodb"
    for cmd in (["run", "--trials", "1", "--space", str(_space(tmp_path))], ["report"]):
        proc = subprocess.run(
            [sys.executable, "-m", "msplora.search", *cmd, "--storage", url],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "s3cr3t-pw" not in proc.stdout + proc.stderr
        assert "msplora:***@127.0.0.1:1/nodb: cannot open" in _one_error_line(proc.stderr)


# -- report ---------------------------------------------------------------------------------------------
def test_report_on_fabricated_multi_objective_study(tmp_path):
    storage = open_storage(str(tmp_path / "r.log"))
    sp = load_space(SPACE)
    info = ModelInfo(6, {"query": (384, 384), "value": (384, 384)})
    study = create_study(storage, "fab", sp, ["--x=1"], info.to_dict())
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    ctx = TrialContext(sp, info, list(sp.configs), [], tmp_path / "out" / "fab")
    assert not work(study, ctx, 8, fit_fn=fake_fit).tripped
    study = optuna.load_study(study_name="fab", storage=storage)
    _assert_exact(study, 8)
    md = report(study, tmp_path / "out" / "fab")
    out = tmp_path / "out" / "fab"
    assert "Pareto front" in md and md.count("\n| ") >= 3
    for png in ("history.png", "importances.png", "pareto_front.png"):
        assert (out / png).stat().st_size > 5000
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert set(best) == {"model"} and MSPLoRAConfig(**best["model"]["pyramid"]).levels
    assert len(list((out / "front").glob("*.yaml"))) == len(study.best_trials)
    assert study.metric_names == ["val/accuracy", "trainable params"]  # named: the dashboard labels them


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("multi", [False, True])
def test_importances_rank_what_makes_the_objective_best(direction, multi):
    """A synthetic study with a known answer: only `good` decides the best trials (the best
    decile is where good > 0.9), only `bad` decides the worst (bad > 0.9). Importance must name
    `good`; taking the objective's low values as best (Optuna 5's PED-ANOVA default with a
    target, whatever the direction) names `bad`."""
    sign = 1.0 if direction == "maximize" else -1.0
    directions = [direction, "minimize"] if multi else [direction]
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(300):
        t = study.ask()
        good, bad = t.suggest_float("good", 0, 1), t.suggest_float("bad", 0, 1)
        metric = sign * (10.0 * (good > 0.9) - 10.0 * (bad > 0.9) + 0.01 * good)
        study.tell(t, [metric, 1.0] if multi else metric)
    imp = param_importances(study)
    # margin: a 2x gap; with 300 trials the wrong reading gives `bad` the larger share
    assert imp["good"] > 2 * imp["bad"], imp


def test_trial_past_the_nth_is_closed_untrained_as_surplus(tmp_path):
    """Two slots, both taken by RUNNING trials (another worker's): a third trial, as a worker
    that asked at the same moment would get, is closed as surplus without a fit and stops it."""
    sp = load_space(SPACE)
    info = ModelInfo(6, {"query": (384, 384), "value": (384, 384)})
    study = optuna.create_study(directions=sp.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    others = [study.ask(), study.ask()]
    called = []
    objective = make_objective(
        TrialContext(sp, info, list(sp.configs), [], tmp_path),
        fit_fn=lambda *a, **k: called.append(1) or fake_fit(*a, **k),
        n_trials=2,
    )
    study.optimize(objective, n_trials=5, catch=(Exception,))  # stops after the first (surplus) trial
    (third,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert third.number == 2 and third.user_attrs["surplus"] and not called and len(study.trials) == 3
    for t in others:
        study.tell(t, [0.5, 1.0])
    assert counts(study) == {"COMPLETE": 2, "SURPLUS": 1}


def test_budget_makes_big_pyramids_infeasible_without_training(tmp_path):
    sp = load_space(SPACE)
    sp.max_adapter_params = 20_000
    info = ModelInfo(6, {"query": (384, 384), "value": (384, 384)})
    called = []
    study = optuna.create_study(directions=sp.directions, sampler=optuna.samplers.RandomSampler(seed=1))
    objective = make_objective(
        TrialContext(sp, info, list(sp.configs), [], tmp_path),
        fit_fn=lambda *a, **k: called.append(1) or fake_fit(*a, **k),
    )
    study.optimize(objective, n_trials=25)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(t.user_attrs["adapter_params"] > 20_000 for t in pruned)
    assert all(t.user_attrs["constraint"][0] <= 0 for t in study.trials if t.state.name == "COMPLETE")
    assert len(called) == 25 - len(pruned)


@pytest.mark.slow
def test_one_real_tiny_trial_end_to_end_and_best_yaml_fits(tmp_path, tiny_bert_dir):
    """A real fit through the search (tiny BERT), then its best.yaml accepted by `fit`."""
    from msplora.training.cli import cli_main

    fit = _tiny_fit(tiny_bert_dir, "--trainer.max_epochs=2")
    space = _space(tmp_path, objective="single", sampler={"name": "random", "seed": 0})
    storage = str(tmp_path / "study.log")
    proc = _run(tmp_path, storage, "--trials", "1", "--workers", "1", "--space", str(space), extra=fit)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = _open(storage)
    (t,) = study.trials
    assert t.state.name == "COMPLETE" and 0 <= t.value <= 1 and t.user_attrs["monitor"] == "val/accuracy"
    assert study.metric_names == ["val/accuracy"]
    run = Path(t.user_attrs["run_dir"])
    m = json.loads(next(run.rglob("metrics.json")).read_text())
    assert m["adapter_params"] == t.user_attrs["adapter_params"]  # the formula the budget uses is the real count
    assert m["global_step"] == 8  # 2 epochs x 4 steps of 16
    rep = subprocess.run(
        [sys.executable, "-m", "msplora.search", "report", "--storage", storage, "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert rep.returncode == 0, rep.stderr
    best = tmp_path / "out" / "s" / "best.yaml"
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/base.yaml"),
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--config",
            str(best),
            f"--model.model={tiny_bert_dir}",
        ],
        run=False,
    )
    assert cli.model.pyramid.to_dict()["levels"] == [
        {**lv, "name": cli.model.pyramid.levels[i].name, "groups": lv.get("groups"), "group_size": lv.get("group_size")}
        for i, lv in enumerate(t.user_attrs["overlay"]["model"]["pyramid"]["levels"])
    ]


@pytest.mark.slow
def test_ddp_trial_two_gloo_ranks_same_config_and_pruning_reaches_both(tmp_path, tiny_bert_dir):
    """Each trial trains on 2 CPU ranks; a pruner that always prunes (after epoch 0) must stop both.
    On the journal storage: rank 1 never opens the study (optuna-integration's callback needed RDB)."""
    fit = _tiny_fit(
        tiny_bert_dir,
        "--trainer.max_epochs=4",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
    )
    space = _space(
        tmp_path,
        objective="single",
        sampler={"name": "random", "seed": 0},
        pruner={"name": "threshold", "lower": 2.0, "n_warmup_steps": 1},
    )
    storage = str(tmp_path / "study.log")
    proc = _run(tmp_path, storage, "--trials", "2", "--workers", "1", "--space", str(space), extra=fit)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    study = _open(storage)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        assert sorted(int(k) for k in t.intermediate_values) == [0, 1]  # pruned at epoch 1, not later
        run = tmp_path / "out" / "s" / "trials" / f"{t.number:04d}"
        rank0, rank1 = (json.loads((run / f"pyramid.rank{r}.json").read_text()) for r in (0, 1))
        assert (
            rank1 == rank0 and [lv["rank"] for lv in rank0] == t.user_attrs["ranks"]
        )  # both trained the trial's config
        steps = json.loads(next(run.rglob("metrics.json")).read_text())["global_step"]
        assert steps == 4  # 2 epochs x 64 / (16 x 2 ranks), then both ranks stopped
