"""Training state: a fit killed with SIGKILL and resumed with ``--ckpt_path last`` ends where the
uninterrupted fit ends; resuming refuses settings the checkpoint would override; run folders,
status files, last.ckpt and progress lines."""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import msplora
from msplora.training.callbacks import AtomicCheckpointIO, LineProgress, progress_bar
from msplora.training.cli import claim_run_dir, cli_main
from msplora.training.data import DataError
from msplora.training.loader import ResumableDataLoader, ResumableRandomSampler
from msplora.training.module import MSPLoRAModule
from tests.conftest import REPO, fit_cli, run_ddp_script

CONFIGS = REPO / "configs"


def fit_args(root: Path, model_dir: Path, *extra: str) -> list[str]:
    """80 samples in batches of 16: 5 steps an epoch, validation at each epoch end."""
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        f"--model.model={model_dir}",
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.max_train_samples=80",
        "--data.init_args.max_eval_samples=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_length=32",
        *extra,
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the loader


def batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_resumable_loader_draws_the_order_and_rng_of_shuffle_true():
    """Runs started before the resumable loader existed stay comparable: same batches in every
    epoch, and the global RNG (dropout) left where DataLoader(shuffle=True) leaves it."""
    data = list(range(50))
    torch.manual_seed(3)
    plain = [batches(DataLoader(data, batch_size=7, shuffle=True)) for _ in range(3)]
    after_plain = torch.rand(4)
    torch.manual_seed(3)
    loader = ResumableDataLoader(data, batch_size=7, sampler=ResumableRandomSampler(data))
    assert [batches(loader) for _ in range(3)] == plain
    assert torch.equal(torch.rand(4), after_plain)


@pytest.mark.parametrize("stop", [3, 8], ids=["mid_epoch", "epoch_end"])
@pytest.mark.parametrize("late", [False, True], ids=["loaded_before_iter", "loaded_after_iter"])
def test_resumable_loader_continues_where_it_stopped(stop, late):
    """A new loader given the state after `stop` batches yields what the uninterrupted loader
    yields next, and puts the RNG back where it was. `late`: the state arrives after iter(), as
    when Lightning built the loader before restoring (Lightning-AI/pytorch-lightning#20550)."""
    data = list(range(50))  # 8 batches of 7 (the last holds 1)
    torch.manual_seed(5)
    loader = ResumableDataLoader(data, batch_size=7, sampler=ResumableRandomSampler(data))
    whole = batches(loader) + batches(loader)
    torch.manual_seed(5)
    it = iter(loader)
    done = [next(it).tolist() for _ in range(stop)]
    state = loader.state_dict()
    if stop == len(loader):
        it = iter(loader)  # the uninterrupted run's next epoch
    next_batch = next(it).tolist()
    expected_rng = torch.rand(3)  # what the uninterrupted run draws after that batch (dropout, say)

    torch.manual_seed(123)  # a new process: other RNG state, fresh loader
    fresh = ResumableDataLoader(data, batch_size=7, sampler=ResumableRandomSampler(data))
    if late:
        it = iter(fresh)
        fresh.load_state_dict(state)
    else:
        fresh.load_state_dict(state)
        it = iter(fresh)
    first = next(it).tolist()
    assert first == next_batch
    assert torch.equal(torch.rand(3), expected_rng)
    rest = [first, *(b.tolist() for b in it)]
    if stop < len(loader):
        assert done + rest == whole[: len(loader)]
        assert fresh.state_dict()["batches"] == len(loader)  # counted on from where it resumed
    else:  # saved at the epoch's end: the next epoch is the uninterrupted run's second one
        assert rest == whole[len(loader) :]


def test_resumable_loader_replays_a_sampler_with_its_own_generator():
    """transformers' LengthGroupedSampler (instruction data, group_by_length) draws from its own
    seeded generator, which a new process recreates at its seed: the state carries it."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    data = list(range(40))

    def loader() -> ResumableDataLoader:
        sampler = LengthGroupedSampler(4, lengths=[i % 7 for i in data], generator=torch.Generator().manual_seed(0))
        return ResumableDataLoader(data, batch_size=4, sampler=sampler)

    first = loader()
    whole = batches(first) + batches(first)  # two epochs: the second is another order
    assert whole[:10] != whole[10:]
    for stop in (13, 10):  # inside the second epoch; at the end of the first
        run = loader()
        it = iter(run)
        done = [next(it).tolist() for _ in range(min(stop, 10))]
        if stop > 10:
            it = iter(run)
            done += [next(it).tolist() for _ in range(stop - 10)]
        state = run.state_dict()
        fresh = loader()
        fresh.load_state_dict(state)
        assert done + batches(fresh) == whole, stop


def test_resumable_loader_refuses_a_state_of_another_batch_size():
    data = list(range(50))
    loader = ResumableDataLoader(data, batch_size=7, sampler=ResumableRandomSampler(data))
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = ResumableDataLoader(data, batch_size=5, sampler=ResumableRandomSampler(data))
    with pytest.raises(msplora.ConfigError, match="batch size was 7, this run's is 5"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- kill -9 and resume

KILL_SCRIPT = """
import os, signal, sys
import lightning as L
from msplora.training.cli import cli_main

class KillAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

cli = cli_main(sys.argv[2:], run=False)
cli.trainer.callbacks.append(KillAt(int(sys.argv[1])))
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
"""


TERM_AT = """
import os, signal
import lightning as L

class TermAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_stops_the_fit_with_status_143_and_says_so(tmp_path, tiny_bert_dir):
    """Lightning stops at the next batch with a SystemExit of no code: exit 0 would tell `make`, a
    shell loop or a scheduler that the run finished. It is 143 (as a shell reports SIGTERM), one
    line on stderr, and the run's status.json says interrupted."""
    (tmp_path / "term_at.py").write_text(TERM_AT)
    root = tmp_path / "runs"
    args = fit_args(root, tiny_bert_dir, "--trainer.max_epochs=3", "--last_checkpoint.every_n_steps=2")
    args += ['--trainer.callbacks+={"class_path": "term_at.TermAt", "init_args": {"step": 7}}']
    proc = subprocess.run(
        [sys.executable, "-m", "msplora", "fit", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"},
        timeout=600,
    )
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("msplora fit: stopped by SIGTERM") and "--ckpt_path last" in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    status = json.loads((root / "version_0" / "status.json").read_text())
    assert (status["status"], status["error"], status["global_step"]) == ("interrupted", "SIGTERM", 7)
    assert torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def csv_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_killed_fit_resumed_from_last_ends_as_the_uninterrupted_fit(tmp_path, tiny_bert_dir, monkeypatch):
    """3 epochs of 5 steps, last.ckpt every 3 steps and at each validation. A run killed with
    SIGKILL at a random step, then resumed with --ckpt_path last, ends with the same adapter, head,
    optimizer and metrics (exactly: CPU, same seed), in the same run folder, with the same
    metrics.csv rows. Right after the restore, the module, AdamW moments, LR schedule and best
    tracking equal what last.ckpt holds."""
    extra = ["--trainer.max_epochs=3", "--last_checkpoint.every_n_steps=3"]
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    fit_cli(fit_args(whole_root, tiny_bert_dir, *extra))

    # Any step after the first checkpoint; MSPLORA_TEST_SEED draws other ones.
    kill = random.Random(os.environ.get("MSPLORA_TEST_SEED", "resume")).randint(4, 14)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(kill), *fit_args(killed_root, tiny_bert_dir, *extra)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run = killed_root / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    # Written every 3 steps and at each validation (epoch ends: 5, 10); the kill comes before the
    # checkpoint callbacks of its own step (Lightning runs those last).
    assert saved["global_step"] == max(s for s in (3, 5, 6, 9, 10, 12) if s < kill), kill
    assert json.loads((run / "status.json").read_text())["status"] == "running"  # no one said otherwise

    seen = {}
    original = MSPLoRAModule.on_train_start

    def capture(self):  # after Lightning restored everything, before the first resumed step
        original(self)
        trainer = self.trainer
        seen["state"] = {k: v.clone() for k, v in self.state_dict().items() if k in saved["state_dict"]}
        # state_dict()s hold the live tensors, which training goes on updating: copy them now
        seen["optimizer"] = copy.deepcopy(trainer.optimizers[0].state_dict())
        seen["scheduler"] = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
        seen["callbacks"] = copy.deepcopy({type(c).__name__: c.state_dict() for c in trainer.callbacks})

    monkeypatch.setattr(MSPLoRAModule, "on_train_start", capture)
    fit_cli([*fit_args(killed_root, tiny_bert_dir, *extra), "--ckpt_path=last"])

    # -- restored state equals the checkpoint
    assert seen["state"].keys() == saved["state_dict"].keys()
    assert all(torch.equal(seen["state"][k], saved["state_dict"][k]) for k in saved["state_dict"])
    opt = saved["optimizer_states"][0]
    assert opt["param_groups"] == seen["optimizer"]["param_groups"]
    for i, moments in opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(seen["optimizer"]["state"][i][name], moments[name]), (i, name)
    assert seen["scheduler"] == saved["lr_schedulers"][0]
    best_saved = next(v for k, v in saved["callbacks"].items() if k.startswith("BestAdapter"))
    assert seen["callbacks"]["BestAdapter"] == best_saved

    # -- and the resumed run ends as the uninterrupted one
    assert sorted(p.name for p in killed_root.iterdir()) == ["version_0"]  # same folder, no version_1
    whole_run = whole_root / "version_0"
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (whole_run, run))
    for key in ("value", "best_epoch", "global_step", "epochs"):
        assert a[key] == b[key], key
    # Same seed, same data order, same dropout masks on CPU: equal to float rounding, 1e-6 allowed.
    assert a["final"].keys() == b["final"].keys()
    assert all(abs(a["final"][k] - b["final"][k]) <= 1e-6 for k in a["final"]), (a["final"], b["final"])
    end_a, end_b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (whole_run, run))
    for k, v in end_a["state_dict"].items():
        assert torch.allclose(v, end_b["state_dict"][k], atol=1e-6, rtol=0), k
    for i, moments in end_a["optimizer_states"][0]["state"].items():
        assert torch.allclose(moments["exp_avg_sq"], end_b["optimizer_states"][0]["state"][i]["exp_avg_sq"], atol=1e-9)
    # The history is whole: every step logged once, as the uninterrupted run logged it.
    rows_a, rows_b = csv_rows(whole_run), csv_rows(run)
    assert [(r["step"], r["train/loss"]) for r in rows_a] == [(r["step"], r["train/loss"]) for r in rows_b]
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished" and status["resumed_from"] == str(last)
    assert [h["status"] for h in status["history"]] == ["running"]  # the killed attempt, kept
    assert (run / "config.yaml").exists() and (run / f"config.resumed_at_step_{saved['global_step']}.yaml").exists()


DDP_SCRIPT = """
import sys, torch, msplora
from msplora.training.run import compose, fit
setup = compose(args=sys.argv[2:])  # argv[1] is "fit": Lightning re-runs this command line for rank 1
fit(setup)
cli = setup.cli
bank = msplora.get_bank(cli.model.model)
path = f"{cli.trainer.default_root_dir}/rank{cli.trainer.global_rank}.pt"
torch.save({k: v.detach().clone() for k, v in bank.state_dict().items()}, path)
"""


@pytest.mark.slow
def test_killed_ddp_fit_resumed_from_last_ends_as_the_uninterrupted_fit(tmp_path, tiny_bert_dir):
    """2 gloo processes: Lightning's DistributedSampler is fast-forwarded, each rank's RNG comes
    back from the checkpoint; both ranks end with the uninterrupted run's adapter and metrics."""
    extra = ["--trainer.max_epochs=3", "--last_checkpoint.every_n_steps=2", "--trainer.devices=2"]
    extra += ["--trainer.strategy=ddp"]  # 40 samples a rank: 3 steps an epoch
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    whole_root.mkdir()
    whole = run_ddp_script(DDP_SCRIPT, ["fit", *fit_args(whole_root, tiny_bert_dir, *extra)], whole_root)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)  # both ranks run it, both die at step 5
    proc = subprocess.run(
        [sys.executable, str(script), "5", *fit_args(killed_root, tiny_bert_dir, *extra)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = torch.load(killed_root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4  # mid-epoch: epoch 1 had one batch done
    resumed = run_ddp_script(
        DDP_SCRIPT, ["fit", *fit_args(killed_root, tiny_bert_dir, *extra), "--ckpt_path=last"], killed_root
    )
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6, rtol=0) for k in whole)  # CPU, same seed
    a, b = (json.loads((r / "version_0" / "metrics.json").read_text()) for r in (whole_root, killed_root))
    assert a["value"] == b["value"] and a["global_step"] == b["global_step"] == 9
    assert all(abs(a["final"][k] - b["final"][k]) <= 1e-6 for k in a["final"])
    assert sorted(p.name for p in killed_root.glob("version_*")) == ["version_0"]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("finished")
    args = fit_args(root, tiny_bert_dir, "--trainer.max_epochs=1")
    fit_cli(args)
    return root, args


@pytest.mark.parametrize(
    "override, says",
    [
        (
            ["--config", str(REPO / "ablations" / "lora.yaml")],
            # names the saved and the given pyramid
            r"model\.pyramid: the checkpoint holds the pyramid G8 M4/3g L2 on .*"
            r"this run gives L8 on ",
        ),
        (
            ["--model.lr=0.01"],
            r"model\.lr: the checkpoint has 0\.0004, this run gives 0\.01; the checkpoint's optimizer",
        ),
        (["--data.init_args.batch_size=8"], r"data\.batch_size: the checkpoint has 16, this run gives 8"),
    ],
    ids=["pyramid", "lr", "batch_size"],
)
def test_resume_refuses_settings_the_checkpoint_would_override(finished_run, override, says):
    root, args = finished_run
    before = snapshot(root)
    with pytest.raises(msplora.ConfigError, match=says):
        fit_cli([*args, *override, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert snapshot(root) == before  # a refusal changes nothing, and claims no folder


def test_resume_honours_settings_it_can_follow(finished_run):
    """max_epochs is the trainer's, not the checkpoint's: the resumed run trains the extra epoch."""
    root, args = finished_run
    cli = fit_cli([*args, "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert cli.trainer.global_step == 10 and cli.trainer.current_epoch == 2
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]


def test_checkpoint_of_another_pyramid_is_refused_on_load(finished_run):
    """Past the CLI (trainer.fit with a path), strict_loading=False must not load nothing silently."""
    root, args = finished_run
    cli = cli_main([*args, "--config", str(REPO / "ablations" / "lora.yaml")], run=False)
    ckpt = root / "version_0" / "checkpoints" / "best.ckpt"
    with pytest.raises(msplora.ConfigError, match=r"does not fit this model: 4 of another shape.*another pyramid"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)


# --------------------------------------------------------------------------- run folders and status


def test_run_folder_claims_never_collide(tmp_path):
    """8 claimers taking 5 folders each, released at once: 40 distinct versions. (Picking "one past
    the highest existing version" and letting the logger create it gave two fits one folder.)"""
    start = threading.Barrier(8)

    def claim(_) -> list[int]:
        start.wait()
        return [claim_run_dir(tmp_path) for _ in range(5)]

    with ThreadPoolExecutor(8) as pool:
        got = [v for vs in pool.map(claim, range(8)) for v in vs]
    assert sorted(got) == list(range(40))
    assert sorted(int(p.name.split("_")[1]) for p in tmp_path.iterdir()) == list(range(40))


def test_fit_failing_before_its_first_step_leaves_no_run_folder(tmp_path, tiny_bert_dir):
    with pytest.raises(msplora.ConfigError, match="matches no module"):
        fit_cli(fit_args(tmp_path, tiny_bert_dir, "--model.pyramid.targets=[q_proj]"))
    assert list(tmp_path.glob("version_*")) == []


def test_refused_fit_removes_the_root_folders_it_created_and_keeps_others(tmp_path, tiny_bert_dir):
    """default_root_dir that did not exist goes with the run; one that held something stays as it was."""
    bad = ("--data.init_args.task=mrpc", f"--data.init_args.data_dir={tmp_path / 'no_data'}")  # refused in prepare_data
    (tmp_path / "no_data").mkdir()
    with pytest.raises(DataError, match="no 'train' file"):
        fit_cli(fit_args(tmp_path / "new" / "runs", tiny_bert_dir, *bad))
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    (kept / "version_0").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="no 'train' file"):
        fit_cli(fit_args(kept, tiny_bert_dir, *bad))
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt", "version_0"]
    assert list((kept / "version_0").iterdir()) == []


def test_finished_fit_writes_status_and_progress_lines(tmp_path, tiny_bert_dir, capsys):
    """Output captured (not a terminal): line progress with step, loss, speed and ETA."""
    fit_cli(fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=1", "--trainer.log_every_n_steps=2"))
    status = json.loads((tmp_path / "version_0" / "status.json").read_text())
    assert status["status"] == "finished" and status["global_step"] == 5
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch 0 step")]
    assert [line.split()[3] for line in lines] == ["2/5", "4/5"], out
    assert all("train/loss" in line and "steps/s ETA" in line for line in lines)
    assert "validation at step 5: val/accuracy" in out


def test_progress_bar_flag_turns_it_off_with_base_config(tmp_path, tiny_bert_dir, capsys):
    cli_main(
        ["fit", *fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false")]
    )
    assert "steps/s ETA" not in capsys.readouterr().out
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_checkpoint_write_is_all_or_nothing(tmp_path):
    """A save that fails half-way leaves the previous checkpoint whole and no temporary file."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):
        io.save_checkpoint({"step": torch.tensor(2), "bad": lambda: None}, path)  # torch.save fails mid-way
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_progress_is_the_rich_bar_on_a_terminal(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert isinstance(progress_bar(), RichProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert isinstance(progress_bar(), LineProgress)
