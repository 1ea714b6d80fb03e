"""Plans (``msplora ablation plan``) and run claims: a plan file is checked whole, the shipped MRPC
plan is docs/protocol.md's, workers sharing a results folder never run a run twice, an arm whose
LR another worker is selecting is passed over, abandoned claims are taken over. Fits are faked
(tests/test_ablation.py's ``fake_fit``)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from msplora import ablation
from msplora.ablation.claims import Busy, claim, claim_path
from msplora.ablation.plan import Plan, load_plan, status, work
from tests.conftest import REPO
from tests.test_ablation import S


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def small_plan(tmp_path, model: Path, **extra) -> Plan:
    fields = {
        "task": "sentiment",
        "arms": ["full", "lora"],
        "seeds": 3,
        "round": 2,
        "fixed": {"head_only": 1},
        "lrs": [1e-3, 2e-3],
        "extend": 0,
        "steps": 2,
        "extra": [f"--model.model={model}"],
        **extra,
    }
    return load_plan(str(write_plan(tmp_path, json.dumps(fields))))  # JSON is YAML


def test_the_shipped_mrpc_plan_is_the_protocol_s():
    plan = load_plan("mrpc")
    text = (REPO / "docs" / "protocol.md").read_text()
    table = text.split("## MRPC plan")[1]
    arms = [a for a in re.findall(r"^  \| `(\w+)` \|", table, flags=re.M) if a != "head_only"]
    assert list(plan.arms) == arms and plan.fixed == {"head_only": 3}
    assert (plan.seeds, plan.lrs, plan.extend, plan.selection_seeds, plan.margin) == (10, (1e-3, 2e-3, 4e-3), 2, 1, 1.0)
    assert plan.baseline == "lora_budget" and Path(plan.config).is_file()
    assert set(plan.compare) == {("full", "lora"), ("pyramid_small", "lora_r2"), ("pyramid_small", "tied_global")}
    assert load_plan("stsb").arms == ("full", "lora", "lora_budget")
    low = load_plan("stsb_low_lr")  # docs/protocol.md's STS-B low-LR plan, in its own folder
    assert (low.arms, low.lrs, low.extend, low.seeds, low.folder) == (
        ("full", "lora_budget", "lora"),
        (5e-4,),
        0,
        5,
        "stsb_low_lr",
    )
    assert "folder`), so the\n  STS-B plan's records are never redone" in text


def test_the_shipped_mrpc_plan_continues_the_committed_runs():
    """The plan signs each arm's runs as its committed MRPC results (selection and reported) were
    signed, so it skips them; with or without the progress-bar override it carries."""
    import dataclasses

    plan = load_plan("mrpc")
    for arm in [*plan.arms, *plan.fixed]:
        folder = REPO / "results/ablations/mrpc" / arm
        stored = {
            json.loads(p.read_text())["signature"] for p in [*folder.glob("seed*.json"), *folder.glob("lr_sweep/*")]
        }
        head_lr = json.loads((folder / "seed0.json").read_text())["head_lr"]
        for extra in (list(plan.extra), []):
            recipe = ablation.base_recipe(
                ablation.variant_path(arm), ablation.task_config("mrpc", plan.config), plan.steps, extra
            )
            recipe = dataclasses.replace(recipe, overrides={**recipe.overrides, "model.head_lr": head_lr})
            assert stored == {ablation.run_signature(recipe)}, (arm, extra)


def test_targets_go_in_rounds_with_the_fixed_arms_after_the_first(tmp_path, tiny_bert_dir):
    plan = small_plan(tmp_path, tiny_bert_dir)
    assert plan.targets() == [("full", 2), ("lora", 2), ("head_only", 1), ("full", 3), ("lora", 3)]


@pytest.mark.parametrize(
    "text, says",
    [
        ("task: mrpc\narms: [full]\n", "seeds: missing"),
        ("task: mrpc\narms: [full, nope]\nseeds: 2\n", "unknown ablation 'nope'"),
        ("task: mrpc\narms: [full]\nseeds: 2\nsede: 3\n", "sede: not a plan key"),
        ("task: mrpc\narms: [full]\nseeds: 0\n", "seeds: 0 is not a whole number"),
        ("task: mrpc\narms: [full]\nseeds: 2\nlrs: [a]\n", "lrs: ['a'] is not a list of numbers"),
        ("task: mrpc\narms: [full]\nseeds: 2\ncompare: [full-lora]\n", "compare: 'full-lora' is not A:B"),
        ("task: mrpc\narms: [full]\nseeds: 2\nmargin: -1\n", "margin: -1"),
        ("task: mrpc\narms: [full]\nseeds: 2\nfolder: ../up\n", "folder: '../up' is not a folder name"),
        ("task: [mrpc\n", "not valid YAML"),
        ("- a\n", "not a mapping"),
    ],
)
def test_a_bad_plan_is_one_line_naming_the_key(tmp_path, text, says):
    with pytest.raises(ablation.AblationError) as e:
        load_plan(str(write_plan(tmp_path, text)))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_claim_is_one_worker_s_and_goes_when_it_ends(tmp_path):
    result = tmp_path / "seed0.json"
    with claim(result):
        info = json.loads(claim_path(result).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(Busy), claim(result):
            pass
    assert not claim_path(result).exists()
    with pytest.raises(RuntimeError), claim(result):  # released when the run fails too
        raise RuntimeError("fit failed")
    assert not claim_path(result).exists()


def test_a_heartbeat_keeps_a_claim_fresh_and_abandoned_claims_are_taken_over(tmp_path):
    result = tmp_path / "seed0.json"
    lock = claim_path(result)
    with claim(result, heartbeat=0.05):
        os.utime(lock, (0, 0))  # as if untouched since 1970: the next beat renews it
        deadline = time.time() + 30
        while lock.stat().st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.stat().st_mtime < 30
    # a dead process on this host: taken over at once
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "since": 0}))
    with claim(result):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # another host: only once it has not been touched for stale_after seconds
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(Busy), claim(result, stale_after=60):
        pass
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with claim(result, stale_after=60):
        pass


def hold(path: Path) -> None:
    """A claim of a live worker on another host (fresh heartbeat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    claim_path(path).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": time.time()}))


def test_runs_held_elsewhere_are_left_to_their_worker(tmp_path, tiny_bert_dir, fake_fit):
    calls, _ = fake_fit
    out = tmp_path / "sentiment" / "full"
    extra = [f"--model.model={tiny_bert_dir}"]

    def run(**kw):
        return ablation.run_variant(
            "full", "sentiment", 3, [1e-3, 2e-3], None, 2, extra, root=tmp_path, log=lambda *_: None, claims=True, **kw
        )

    hold(out / "lr_sweep" / f"lr0.002_seed{S}.json")  # the LR cannot be chosen yet: nothing reported runs
    with pytest.raises(Busy):
        run()
    assert calls == [(1e-3, S)]
    claim_path(out / "lr_sweep" / f"lr0.002_seed{S}.json").unlink()
    hold(out / "seed1.json")  # a reported seed held elsewhere: the others run, then Busy
    with pytest.raises(Busy, match=r"seeds \[1\]"):
        run()
    assert calls == [(1e-3, S), (2e-3, S), (2e-3, 0), (2e-3, 2)]
    assert not (out / "seed1.json").exists() and (out / "seed2.json").exists()


def test_two_workers_share_a_plan_and_run_every_run_once(tmp_path, tiny_bert_dir, fake_fit, monkeypatch):
    _, knobs = fake_fit
    real, runs, by = ablation.runner.fit_and_test, [], set()
    both = threading.Barrier(2, timeout=60)

    def slow(recipe, lr, seed, run_dir):
        runs.append((recipe.configs[-1].stem, lr, seed))  # the overlay is the last config
        if threading.get_ident() not in by:  # each worker's first run waits until the other's starts
            by.add(threading.get_ident())
            both.wait()
        time.sleep(0.05)  # long enough for the workers to meet on the same runs
        return real(recipe, lr, seed, run_dir)

    monkeypatch.setattr(ablation.runner, "fit_and_test", slow)
    # Real workers are processes. jsonargparse changes the working directory while it reads a
    # config, which threads of one process would race on: one parse at a time here.
    parse, lock = ablation.runner.parse, threading.Lock()

    def one_at_a_time(*args, **kwargs):
        with lock:
            return parse(*args, **kwargs)

    monkeypatch.setattr(ablation.runner, "parse", one_at_a_time)
    knobs["vals"] = {1e-3: 0.7, 2e-3: 0.8}
    plan = small_plan(tmp_path, tiny_bert_dir)
    root = tmp_path / "results"
    errors = []

    def worker():
        try:
            work(plan, root, log=lambda *_: None, poll=0.05)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    # full, lora: 2 sweep LRs + 3 seeds each; head_only: 1 seed, no sweep
    assert len(runs) == len(set(runs)) == 2 * (2 + 3) + 1 and len(by) == 2  # both worked, none twice
    for arm, n in (("full", 3), ("lora", 3), ("head_only", 1)):
        assert all((root / "sentiment" / arm / f"seed{k}.json").is_file() for k in range(n))
    assert not list(root.rglob("*.claim"))
    text = status(plan, root)
    assert re.search(r"full\s+2\s+3/3\s+-", text) and re.search(r"head_only\s+0\s+1/1\s+-", text)


def test_a_worker_waits_for_runs_held_elsewhere_and_takes_them_if_they_come_back(
    tmp_path, tiny_bert_dir, fake_fit, monkeypatch
):
    """A run another worker holds is waited for; when that worker dies without finishing it (its
    claim goes away), this worker runs it."""
    calls, knobs = fake_fit
    knobs["vals"] = {1e-3: 0.7, 2e-3: 0.8}
    plan = small_plan(tmp_path, tiny_bert_dir, arms=["full"], fixed={}, seeds=1)
    root = tmp_path / "results"
    held = root / "sentiment" / "full" / "seed0.json"
    hold(held)
    lines = []

    def log(line):
        lines.append(line)
        if "looking again" in line:  # that worker dies a few passes after this one starts waiting
            threading.Timer(1.5, lambda: claim_path(held).unlink(missing_ok=True)).start()

    work(plan, root, log=log, poll=0.1)
    assert (2e-3, 0) in calls and held.is_file()
    # several passes, each line once: the sweep's "done before", the held seed, the wait
    assert sum("looking again" in x for x in lines) == 1 and any("done before" in x for x in lines)
    assert sum("another worker runs it" in x for x in lines) == 1
    assert len(lines) == len(set(lines)) and any(x.endswith("seed=0: running") for x in lines)


def test_a_worker_starts_no_run_it_cannot_finish_in_time(tmp_path, tiny_bert_dir, fake_fit, monkeypatch):
    """With a deadline, a run starts only when the median finished run fits in the time left (any
    run, while none has finished); the worker then stops, and the plan later goes on from there."""
    calls, knobs = fake_fit
    knobs["vals"] = {1e-3: 0.7, 2e-3: 0.8}
    fake = ablation.runner.fit_and_test
    monkeypatch.setattr(ablation.runner, "fit_and_test", lambda *a: {**fake(*a), "wall_time_s": 100.0})
    plan = small_plan(tmp_path, tiny_bert_dir)
    root = tmp_path / "results"
    lines = []
    work(plan, root, log=lines.append, deadline=time.time() + 60)  # one run of "100 s" fits nothing more
    assert calls == [(1e-3, ablation.runner.SELECTION_SEED)] and not list(root.rglob("*.claim"))
    assert "time is up (full: lr=0.002 seed=1000 not started)" in lines[-1]
    work(plan, root, log=lines.append, deadline=time.time() + 99)  # 100 s does not fit in 99
    assert len(calls) == 1
    work(plan, root, log=lines.append, deadline=time.time() + 1000)  # each "100 s" run fits
    assert len(calls) == 2 * (2 + 3) + 1  # full, lora: 2 selection runs + 3 seeds; head_only: 1
    calls.clear()
    work(plan, root, log=lines.append)  # all done: nothing runs again
    assert calls == []


def test_plan_command_status(tmp_path, capsys):
    ablation.main(["plan", "mrpc", "--status", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "plan mrpc: task mrpc, 10 reported seeds" in out and re.search(r"tied_global\s+0\s+0/10\s+-", out)
    assert "63 reported runs left, and LR selection runs for full, lora, lora_budget, pyramid_small," in out
    assert "took" not in out
    hold(tmp_path / "mrpc" / "lora" / "seed4.json")
    (tmp_path / "mrpc" / "lora" / "seed0.json").write_text("{}")
    (tmp_path / "mrpc" / "lora" / "seed1.json").write_text('{"wall_time_s": 500.5}')
    (tmp_path / "mrpc" / "head_only").mkdir()
    (tmp_path / "mrpc" / "head_only" / "seed0.json").write_text('{"wall_time_s": 300}')
    ablation.main(["plan", "mrpc", "--status", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"lora\s+0\s+2/10\s+seed4.json \(elsewhere:1\)", out)
    assert "60 reported runs left, and LR selection runs for full, lora_budget, pyramid_small, lora_r2," in out
    assert "a finished reported run took 400 s (median of 2)" in out
    plan = tmp_path / "again.yaml"  # the same plan in its own folder: none of those runs are its
    plan.write_text((REPO / "ablations" / "plans" / "mrpc.yaml").read_text() + "folder: again\n")
    ablation.main(["plan", str(plan), "--status", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"(results: {tmp_path / 'again' / 'mrpc'})" in out and "63 reported runs left" in out


@pytest.mark.slow
def test_two_worker_processes_run_a_real_plan_once_then_report(tmp_path, tiny_bert_dir):
    """``plan --workers 2``: two processes (torch threads split), a tiny model and 2 steps a run:
    every run happens once, across both workers, and the report follows. ``--hours`` reaches both
    workers: with 4 ms, past before they start, neither starts a run. The plan's ``folder`` is
    where everything goes, once (not once more in each worker)."""
    from tests.test_ablation import TINY

    plan = write_plan(
        tmp_path,
        json.dumps(
            {
                "task": "sentiment",
                "arms": ["full", "lora"],
                "seeds": 2,
                "lrs": [1e-3],
                "extend": 0,
                "steps": 2,
                "compare": ["full:lora"],
                "extra": [f"--model.model={tiny_bert_dir}", *TINY],
                "folder": "again",
            }
        ),
    )
    shared = tmp_path / "results"
    root = shared / "again"

    def plan_command(*args):
        return subprocess.run(
            [sys.executable, "-m", "msplora.ablation", "plan", str(plan), "--workers", "2", "--root", str(shared), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
            timeout=600,
        )

    proc = plan_command("--hours", "0.000001", "--no-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running" not in proc.stdout and not list(root.rglob("*.json"))
    assert {m for m in re.findall(r"^\[w(\d)\] \[plan p\] time is up", proc.stdout, flags=re.M)} == {"0", "1"}
    proc = plan_command("--hours", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = re.findall(r"^\[w(\d)\] \[(\w+)\] lr=\S+ seed=(\d+): running$", proc.stdout, flags=re.M)
    assert len(ran) == len({(arm, seed) for _, arm, seed in ran}) == 2 * 3  # 1 selection + 2 seeds, each once
    assert {w for w, _, _ in ran} == {"0", "1"}  # both workers ran some
    for arm in ("full", "lora"):
        recs = [json.loads((root / "sentiment" / arm / f"seed{k}.json").read_text()) for k in range(2)]
        assert [r["seed"] for r in recs] == [0, 1] and all(r["global_step"] == 2 for r in recs)
    assert "| full | lora | 2 |" in (root / "sentiment" / "report.md").read_text()
    assert not list(shared.rglob("*.claim")) and sorted(p.name for p in shared.iterdir()) == ["again"]


def test_the_wait_names_only_runs_still_held(tmp_path, monkeypatch):
    """A long pass finds runs held early on that are done by its end: the worker looks again at
    once, and the line it waits with names only the arms still held (not every arm it ever met
    held); a pass that waits is not repeated without the poll's sleep."""
    plan = Plan(
        name="p",
        task="t",
        config=None,
        arms=("a", "b"),
        seeds=1,
        round=1,
        fixed={},
        lrs=(),
        extend=0,
        selection_seeds=1,
        baseline="b",
        margin=1.0,
        compare=(),
        extra=(),
        steps=None,
    )
    passes = {"n": 0}
    busy = {1: {"a", "b"}, 2: {"b"}, 3: {"b"}, 4: set()}

    def fake_run_variant(arm, *a, **k):
        if arm == "a":
            passes["n"] += 1
            if passes["n"] == 1:
                time.sleep(0.3)  # the first pass ran something: longer than the poll
        if arm in busy[passes["n"]]:
            raise Busy(f"{arm}: held")

    monkeypatch.setattr(ablation.plan, "run_variant", fake_run_variant)
    monkeypatch.setattr(ablation.plan, "variant_path", lambda arm: None)
    lines = []
    work(plan, tmp_path, log=lines.append, poll=0.1)
    assert passes["n"] == 4
    assert lines == ["[plan p] other workers hold runs of b: looking again in 0 s"]
