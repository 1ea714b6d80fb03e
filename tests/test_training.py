"""fit / validate / test through the CLI on tiny models: configs, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import msplora
from msplora.training.cli import cli_main
from tests.conftest import REPO, fit_cli, run_ddp_script, write_glue_task

CONFIGS = REPO / "configs"
# Causal-LM configs (InstructionDataModule) are smoke-run on a tiny LLaMA in test_instruct_fit.py.
# configs/search/ holds search spaces, not fit configs (parsed by test_search.py).
FIT_CONFIGS = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.name != "base.yaml" and "search" not in p.parent.name and "InstructionDataModule" not in p.read_text()
)


def fit_args(tmp: Path, model_dir: Path, *extra: str, config: Path | None = None) -> list[str]:
    args = ["--config", str(CONFIGS / "base.yaml")]
    if config is not None:
        args += ["--config", str(config)]
    return args + [
        f"--model.model={model_dir}",
        f"--trainer.default_root_dir={tmp}",
        "--trainer.accelerator=cpu",
        "--data.init_args.max_train_samples=64",
        "--data.init_args.max_eval_samples=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.max_length=32",
        *extra,
    ]


def metrics_of(run: Path) -> dict:
    return json.loads(next(run.rglob("metrics.json")).read_text())


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS).with_suffix("")))
def test_every_config_parses_and_smoke_runs(config, tmp_path, tiny_bert_dir):
    """Every shipped config, composed on base.yaml, fits 2 steps of its own task and trains."""
    cli = cli_main(fit_args(tmp_path, tiny_bert_dir, config=config), run=False)
    spec = cli.datamodule.spec
    extra = []
    if spec.glue_folder:  # GPU users read the Hub; here a small synthetic copy in the original GLUE layout
        extra.append(f"--data.init_args.data_dir={write_glue_task(tmp_path / 'glue', spec.name)}")
    fit = fit_cli(fit_args(tmp_path, tiny_bert_dir, "--trainer.fast_dev_run=2", *extra, config=config))
    own = yaml.safe_load(config.read_text())
    assert fit.datamodule.hparams.task == own["data"]["init_args"]["task"] and fit.datamodule.spec is spec
    assert fit.model.hparams.lr == own["model"]["lr"]
    assert [vars(lv) for lv in fit.model.pyramid.levels] == [vars(lv) for lv in cli.model.pyramid.levels]
    # it fitted: 2 optimizer steps on a head sized for the task, B moved off its zero init, and
    # the task's selection metric was computed on validation
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
    assert fit.model.model.num_labels == spec.num_labels
    assert all(kb.B.abs().sum() > 0 for kb in msplora.get_bank(fit.model.model).kinds.values())
    monitor, _ = fit.model.monitor
    assert monitor.endswith(spec.metric) and torch.isfinite(fit.trainer.callback_metrics[monitor])


def test_cli_called_from_python_does_not_warn_about_the_callers_argv(tmp_path, tiny_bert_dir, recwarn):
    cli_main(fit_args(tmp_path, tiny_bert_dir), run=False)  # pytest's own sys.argv is set here
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]


def test_fit_real_glue_task_end_to_end(tmp_path, tiny_bert_dir, glue_dir):
    """A tiny model on the original RTE files: metrics.json, small checkpoints, best adapter."""
    args = fit_args(
        tmp_path,
        tiny_bert_dir,
        f"--data.init_args.data_dir={glue_dir}",
        "--trainer.max_epochs=2",
        config=CONFIGS / "rte.yaml",
    )
    fit_cli(args)
    m = metrics_of(tmp_path)
    assert m["task"] == "rte" and m["metric"] == "accuracy" and 0 <= m["value"] <= 1
    assert m["global_step"] == 8 and m["epochs"] == 2
    # adapter: 4 layers of 32x32 q/v at 8/4/2 with 3 groups; head: BERT's classifier 32*2+2
    assert m["adapter_params"] == msplora.parameter_count(
        [{"share": "global", "rank": 8}, {"share": "group", "rank": 4, "groups": 3}, {"share": "layer", "rank": 2}],
        4,
        {"query": (32, 32), "value": (32, 32)},
    )
    assert m["trainable_params"] == m["adapter_params"] + 66
    assert m["lora_r8_adapter_params"] == 2 * 8 * 64 * 4
    run = next(tmp_path.rglob("metrics.json")).parent
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
    # checkpoints hold the adapter and head only: close to trainable params x 4 bytes
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == m["trainable_params"]
    assert (run / "checkpoints" / "best.ckpt").stat().st_size < 5 * 4 * m["trainable_params"] + 200_000
    # the best adapter directory reproduces the best checkpoint's weights
    state = load_file(run / "best_adapter" / "adapter_model.safetensors")
    assert torch.equal(
        state["global.query.A"].reshape(-1, 32), ckpt["state_dict"]["model.msplora_bank.kinds.query.A"][:8]
    )


def test_resume_from_checkpoint(tmp_path, tiny_bert_dir):
    fit_cli(fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=1"))
    last = next(tmp_path.rglob("last.ckpt"))
    cli = fit_cli(fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=2", f"--ckpt_path={last}"))
    assert cli.trainer.global_step == 8  # 4 steps restored + 4 new
    assert cli.trainer.current_epoch == 2


def test_test_stage_loads_the_best_checkpoint_and_writes_metrics(tmp_path, tiny_bert_dir):
    fit_cli(fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=1", "--data.init_args.val_fraction=0.2"))
    run = next(tmp_path.rglob("metrics.json")).parent
    best_path = run / "checkpoints" / "best.ckpt"
    best = torch.load(best_path, weights_only=False)["state_dict"]
    # B starts at zero: the checkpoint's trained B tells a loaded model from a fresh one
    assert best and all(best[k].abs().sum() > 0 for k in best if k.endswith(".B"))
    tested = cli_main(
        ["test", *fit_args(tmp_path, tiny_bert_dir, "--data.init_args.val_fraction=0.2", f"--ckpt_path={best_path}")]
    )
    # the weights the test ran with are best.ckpt's: adapter and head, every tensor
    state = tested.model.state_dict()
    assert set(best) <= set(state)
    for key, value in best.items():
        assert torch.equal(state[key], value), key
    tested_metrics = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    final = next(m["final"] for m in tested_metrics if "test/accuracy" in m.get("final", {}))
    assert final["test/accuracy"] == pytest.approx(float(tested.trainer.callback_metrics["test/accuracy"]))


def test_bad_config_fails_with_clear_message(tmp_path, tiny_bert_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msplora",
            "fit",
            *fit_args(tmp_path, tiny_bert_dir, "--model.pyramid.targets=[q_proj]"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "matches no module" in proc.stderr and "query" in proc.stderr


DDP_SCRIPT = """
import sys, torch, msplora
from msplora.training.run import compose, fit
setup = compose(args=sys.argv[2:])  # argv[1] is "fit": Lightning re-runs this command line for rank 1
fit(setup)
cli = setup.cli
rank = cli.trainer.global_rank
bank = msplora.get_bank(cli.model.model)
torch.save({k: v.detach().clone() for k, v in bank.state_dict().items()}, f"{cli.trainer.default_root_dir}/rank{rank}.pt")
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_the_same_adapter(tmp_path, tiny_bert_dir):
    args = fit_args(tmp_path, tiny_bert_dir, "--trainer.max_epochs=1", "--trainer.devices=2", "--trainer.strategy=ddp")
    run_ddp_script(DDP_SCRIPT, ["fit", *args], tmp_path)
    m = metrics_of(tmp_path)
    assert m["global_step"] == 2  # 64 samples / (16 x 2 ranks)
