"""Optuna search: sampling, study + workers on one storage, kill/rerun, DDP trial, report, PostgreSQL."""

from __future__ import annotations

import contextlib
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
    _queue_lock,
    adapter_params,
    create_study,
    load_space,
    make_objective,
    mid_choices,
    model_info,
    open_storage,
    report,
    sample_levels,
    storage_url,
    top_up,
    work,
    worker_devices,
)
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
def fake_fit(trial, overlay, root, ctx, owner=True):
    """Stands in for a fit: a value from the ranks, after FAKE_FIT_SLEEP seconds."""
    time.sleep(float(os.environ.get("FAKE_FIT_SLEEP", "0")))
    ranks = [lv["rank"] for lv in overlay["model"]["pyramid"]["levels"]]
    n = adapter_params(overlay["model"]["pyramid"]["levels"], ctx.info)
    return {"value": 0.5 + 0.01 * sum(ranks) / (1 + len(ranks)), "trainable_params": n + 770, "monitor": "val/accuracy"}


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


def _assert_exact(study, n: int) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def test_model_info_finds_the_targets_inject_wraps(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    import msplora

    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"model": str(tiny_bert_dir), "pyramid": {"targets": ["query", "value"]}}}))
    info = model_info([str(cfg)], [])
    model = msplora.inject(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir), MSPLoRAConfig(targets=["query", "value"])
    )
    kinds = msplora.get_bank(model).kinds
    assert info.shapes == {k: (kb.d_in, kb.d_out) for k, kb in kinds.items()}
    assert info.n_layers == len(kinds["query"].layer_ids)
    with pytest.raises(SearchError, match=r"matches no module.*Fix"):
        model_info([str(cfg)], ["--model.pyramid.targets=[nope]"])


POP_SCRIPT = """
import json, sys
import optuna
from msplora.search import _queue_lock, open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = open_storage(sys.argv[1])
study = optuna.load_study(study_name="s", storage=storage)
taken = []
while True:
    with _queue_lock(storage):
        trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        break
    taken.append(trial_id)
json.dump(taken, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_four_processes_popping_one_sqlite_queue_never_take_a_trial_twice(tmp_path):
    """SQLite has no SELECT ... FOR UPDATE: without the queue lock, 4 processes popping 80 queued
    trials took 98 (18 twice) when this test was written; with it, each exactly once."""
    db = str(tmp_path / "q.db")
    study = optuna.create_study(study_name="s", storage=open_storage(db))
    for i in range(80):
        study.enqueue_trial({"x": i})
    script = tmp_path / "pop.py"
    script.write_text(POP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, str(script), db, str(tmp_path / f"w{k}.json")], cwd=REPO, env=env)
        for k in range(4)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    taken = [t for k in range(4) for t in json.loads((tmp_path / f"w{k}.json").read_text())]
    assert sorted(taken) == sorted(t._trial_id for t in study.get_trials())
    assert all(t.state.name == "RUNNING" for t in study.get_trials())
    assert isinstance(_queue_lock(open_storage(str(tmp_path / "j.log"))), contextlib.nullcontext)  # journal: safe


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_exactly(tmp_path):
    space = _space(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search = ("--trials", "12", "--workers", "2", "--space", str(space), "--fit-fn", "tests.test_search:fake_fit")
    proc = _run(tmp_path, storage, *search, env={"FAKE_FIT_SLEEP": "0.2"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="s", storage=storage)
    _assert_exact(study, 12)
    assert len({t.user_attrs["worker_pid"] for t in study.get_trials()}) == 2  # both workers took trials
    # rerunning the finished search adds nothing; a different space on the same study is refused
    again = _run(tmp_path, storage, *search)
    assert again.returncode == 0 and len(optuna.load_study(study_name="s", storage=storage).trials) == 12
    other = _run(tmp_path, storage, "--trials", "12", "--space", str(_space(tmp_path, objective="single")))
    assert other.returncode == 2 and "another space" in other.stderr


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried_on_rerun(tmp_path):
    space = _space(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = (
        "--trials",
        "6",
        "--workers",
        "1",
        "--space",
        str(space),
        "--fit-fn",
        "tests.test_search:fake_fit",
        "--heartbeat",
        "1",
        "--grace",
        "3",
    )
    proc = _run(tmp_path, storage, *args, env={"FAKE_FIT_SLEEP": "1.5"}, popen=True)
    running = None
    deadline = time.time() + 120
    while running is None and time.time() < deadline:  # wait for 2 complete trials and a third running
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="s", storage=storage)
        except KeyError:  # not created yet
            continue
        trials = study.get_trials()
        if sum(t.state.name == "COMPLETE" for t in trials) >= 2:
            running = next((t for t in trials if t.state.name == "RUNNING" and "worker_pid" in t.user_attrs), None)
    assert running is not None, proc.communicate()[0][-3000:]
    os.kill(running.user_attrs["worker_pid"], signal.SIGKILL)  # the worker dies mid-trial
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "exit codes [-9]" in out
    study = optuna.load_study(study_name="s", storage=storage)
    before = {t.number: t.values for t in study.get_trials() if t.state.name == "COMPLETE"}
    killed = [t.number for t in study.get_trials() if t.state.name == "RUNNING"]
    assert len(before) >= 2 and killed == [running.number]
    rerun = _run(tmp_path, storage, *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(study_name="s", storage=storage)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed[0]].state.name == "FAIL"
    assert all(trials[n].values == v for n, v in before.items())  # completed trials untouched
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == trials[killed[0]].params  # the retry trains the same config
    _assert_exact(study, 6)


def test_journal_storage_two_workers(tmp_path):
    journal = str(tmp_path / "study.log")
    proc = _run(
        tmp_path,
        journal,
        "--trials",
        "6",
        "--workers",
        "2",
        "--space",
        str(_space(tmp_path)),
        "--fit-fn",
        "tests.test_search:fake_fit",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    _assert_exact(optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal))), 6)


def test_report_on_fabricated_multi_objective_study(tmp_path):
    storage = open_storage(str(tmp_path / "r.db"))
    sp = load_space(SPACE)
    study = create_study(storage, "fab", sp, ["--x=1"])
    info = ModelInfo(6, {"query": (384, 384), "value": (384, 384)})
    ctx = TrialContext(sp, info, [], tmp_path / "out" / "fab")
    top_up(study, 8)
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    assert work(study, storage, ctx, fit_fn=fake_fit) == 8
    md = report(optuna.load_study(study_name="fab", storage=storage), tmp_path / "out" / "fab")
    out = tmp_path / "out" / "fab"
    assert "Pareto front" in md and md.count("\n| ") >= 3
    for png in ("history.png", "importances.png", "pareto_front.png"):
        assert (out / png).stat().st_size > 5000
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert set(best) == {"model"} and MSPLoRAConfig(**best["model"]["pyramid"]).levels
    assert len(list((out / "front").glob("*.yaml"))) == len(study.best_trials)


def test_budget_makes_big_pyramids_infeasible_without_training(tmp_path):
    sp = load_space(SPACE)
    sp.max_adapter_params = 20_000
    info = ModelInfo(6, {"query": (384, 384), "value": (384, 384)})
    called = []
    study = optuna.create_study(directions=sp.directions, sampler=optuna.samplers.RandomSampler(seed=1))
    objective = make_objective(
        TrialContext(sp, info, [], tmp_path), fit_fn=lambda *a, **k: called.append(1) or fake_fit(*a, **k)
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
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = _run(tmp_path, storage, "--trials", "1", "--workers", "1", "--space", str(space), extra=fit)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=storage)
    (t,) = study.trials
    assert t.state.name == "COMPLETE" and 0 <= t.value <= 1 and t.user_attrs["monitor"] == "val/accuracy"
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
    """Each trial trains on 2 CPU ranks; a pruner that always prunes (after epoch 0) must stop both."""
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
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = _run(tmp_path, storage, "--trials", "2", "--workers", "1", "--space", str(space), extra=fit)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    study = optuna.load_study(study_name="s", storage=storage)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        assert sorted(int(k) for k in t.intermediate_values) == [0, 1]  # pruned at epoch 1, not later
        run = tmp_path / "out" / "s" / "trials" / f"{t.number:04d}"
        assert json.loads((run / "params.rank1.json").read_text()) == t.params  # rank 1 trained the same config
        steps = json.loads(next(run.rglob("metrics.json")).read_text())["global_step"]
        assert steps == 4  # 2 epochs x 64 / (16 x 2 ranks), then both ranks stopped


@pytest.mark.postgres
def test_two_workers_on_postgres_lose_and_duplicate_nothing(tmp_path):
    url = os.environ.get("MSPLORA_PG_URL")
    if not url:
        pytest.skip("MSPLORA_PG_URL unset: run `source .ci/postgres.sh` (done by .ci/run)")
    try:
        import sqlalchemy

        sqlalchemy.create_engine(url).connect().close()
    except Exception as e:
        pytest.skip(f"PostgreSQL at {url} unreachable ({type(e).__name__}); start it with .ci/postgres.sh")
    study_name = f"pytest-{os.getpid()}-{time.time_ns()}"
    proc = _run(
        tmp_path,
        url,
        "--trials",
        "10",
        "--workers",
        "2",
        "--space",
        str(_space(tmp_path)),
        "--fit-fn",
        "tests.test_search:fake_fit",
        study=study_name,
        env={"FAKE_FIT_SLEEP": "0.3"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name=study_name, storage=url)
    try:
        _assert_exact(study, 10)
        assert [t.number for t in study.trials] == list(range(10))
        assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 2
    finally:
        optuna.delete_study(study_name=study_name, storage=url)
