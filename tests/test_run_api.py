"""The typed run API (msplora.training.run): one fit from a composed config, a typed result.

What it must keep: the same fit as LightningCLI's own ``fit`` subcommand (the way `msplora fit`
ran before the run API), values equal to what the run wrote to metrics.json, overrides that
parse back to the values given, and refusals that write nothing.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from msplora.errors import UsageError
from msplora.training.cli import MSPLoRACLI
from msplora.training.module import MSPLoRAModule
from msplora.training.run import RunResult, compose, fit, override_args
from tests.conftest import REPO

BASE = REPO / "configs" / "base.yaml"


def tiny(model_dir: Path) -> dict:
    """64 training rows in batches of 16 (4 steps an epoch), 32 validation rows, seed 3."""
    return {
        "model.model": str(model_dir),
        "trainer.accelerator": "cpu",
        "trainer.max_epochs": 2,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "data.init_args.max_train_samples": 64,
        "data.init_args.max_eval_samples": 32,
        "data.init_args.batch_size": 16,
        "data.init_args.max_length": 32,
        "data.init_args.val_fraction": 0.2,  # a carved validation split; the dev split is the test
        "seed_everything": 3,
    }


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "best_adapter" / "adapter_model.safetensors")


def test_run_api_trains_what_lightning_s_fit_subcommand_trains(tmp_path, tiny_bert_dir):
    """Same config, same seed: the run API and LightningCLI(["fit", ...]) (the old `msplora fit`)
    must give bit-identical adapters and the same validation value. Both run the same ops in the
    same order on one CPU thread pool, so equality is exact, not approximate."""
    setup = compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path / "api")
    result = fit(setup)
    old = MSPLoRACLI(
        MSPLoRAModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=["fit", "--config", str(BASE), *override_args(tiny(tiny_bert_dir))]
        + [f"--trainer.default_root_dir={tmp_path / 'cli'}"],
        save_config_kwargs={"overwrite": True},
    )
    old_m = json.loads((Path(old.trainer.log_dir) / "metrics.json").read_text())
    assert result.value == old_m["value"] and result.global_step == old_m["global_step"] == 8
    new_t, old_t = _adapter(result.run_dir), _adapter(Path(old.trainer.log_dir))
    assert new_t.keys() == old_t.keys() and all(torch.equal(new_t[k], old_t[k]) for k in new_t)


def test_result_carries_what_the_run_wrote(tmp_path, tiny_bert_dir):
    result = fit(compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path), test=True)
    assert isinstance(result, RunResult)
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())
    assert result.metrics == on_disk  # the in-memory record is what metrics.json holds
    assert (result.task, result.metric, result.monitor) == ("sentiment", "accuracy", "val/accuracy")
    assert result.value == on_disk["value"] and 0 <= result.value <= 1
    # the test ran on the best checkpoint: its metrics are in the result, the selection metric first
    assert result.test and all(k.startswith("test") for k in result.test)
    assert result.test_value == result.test["test/accuracy"] == on_disk["final"]["test/accuracy"]
    assert result.global_step == 8 and result.epochs == 2 and result.seed == 3
    assert result.lr == 4e-4 and result.best_epoch in (0, 1)  # base.yaml's lr
    # parameters: per level they add up to the adapter, adapter + head to the trainable count
    assert sum(result.params_per_level.values()) == result.adapter_params > 0
    assert result.trainable_params > result.adapter_params
    assert result.best_adapter == result.run_dir / "best_adapter" and result.best_adapter.is_dir()
    assert result.best_checkpoint is not None and result.best_checkpoint.name == "best.ckpt"
    d = result.to_dict()
    assert json.loads(json.dumps(d))["run_dir"] == str(result.run_dir)


def test_validate_first_gives_the_untrained_model_s_score(tmp_path, tiny_bert_dir):
    """B starts at 0, so the validation before training is the base model's (with its new head)."""
    result = fit(compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path), validate_first=True)
    assert set(result.val_before) >= {"val/accuracy", "val/loss"}
    assert result.val_before["val/loss"] > 0 and result.value is not None


@pytest.mark.parametrize(
    "value, text",
    [(True, "true"), (False, "false"), (None, "null"), (3, "3"), (-1, "-1"), ("x/y", "x/y"), ([1, 2], "[1, 2]")],
)
def test_override_values_are_written_as_jsonargparse_reads_them(value, text):
    assert override_args({"a.b": value}) == [f"--a.b={text}"]


def test_float_overrides_parse_back_to_the_same_float(tiny_bert_dir):
    """A swept LR must train at exactly that LR: str(float) is the shortest exact repr."""
    rng = random.Random(0)
    for lr in [rng.uniform(1e-5, 1e-2) for _ in range(5)] + [1e-3 * 0.5, 2e-3 * 1.5]:
        setup = compose([BASE], {**tiny(tiny_bert_dir), "model.lr": lr})
        assert setup.model.hparams.lr == lr


def test_later_sources_win_in_the_documented_order(tmp_path, tiny_bert_dir):
    """configs < overrides < args < root_dir."""
    overlay = tmp_path / "o.yaml"
    overlay.write_text("model:\n  lr: 0.25\n")
    setup = compose([BASE, overlay], {**tiny(tiny_bert_dir), "model.lr": 0.5}, args=["--model.lr=0.75"])
    assert setup.model.hparams.lr == 0.75
    setup = compose([BASE, overlay], tiny(tiny_bert_dir))
    assert setup.model.hparams.lr == 0.25
    setup = compose(
        [BASE], tiny(tiny_bert_dir), args=[f"--trainer.default_root_dir={tmp_path}/a"], root_dir=tmp_path / "b"
    )
    assert setup.trainer.default_root_dir == str(tmp_path / "b")


def test_compose_writes_nothing_and_the_fit_claims_its_folder(tmp_path, tiny_bert_dir):
    """Building a run (what the ablation runner does to check a recipe) creates no folder; the
    run folder appears when the fit starts, and two built runs get two folders."""
    a = compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path / "runs")
    b = compose([BASE], tiny(tiny_bert_dir), root_dir=tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []
    fit(b)
    fit(a)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["version_0", "version_1"]
    assert a.trainer.log_dir == str(tmp_path / "runs" / "version_1")
    assert (tmp_path / "runs" / "version_1" / "tb").is_dir() and (
        tmp_path / "runs" / "version_1" / "metrics.csv"
    ).is_file()


def test_a_bad_key_is_one_line_and_writes_nothing(tmp_path, tiny_bert_dir):
    root = tmp_path / "never"
    with pytest.raises(UsageError) as e:
        compose([BASE], {**tiny(tiny_bert_dir), "model.lrr": 1e-3}, root_dir=root)
    msg = str(e.value)
    assert "\n" not in msg and "model.lrr" in msg and "model.lr" in msg
    assert not root.exists()


def test_no_driver_calls_the_cli_from_python():
    """The ablation runner, the search and the instruct demo go through the
    run API, not by building command lines for LightningCLI."""
    drivers = [REPO / "msplora" / "training" / "instruct_demo.py"]
    drivers += sorted((REPO / "msplora" / "ablation").glob("*.py"))
    drivers += sorted((REPO / "msplora" / "search").glob("*.py"))
    offenders = [p.name for p in drivers if re.search(r"\bcli_main\(|MSPLoRACLI\(", p.read_text())]
    assert offenders == []
