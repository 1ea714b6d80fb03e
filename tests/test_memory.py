"""msplora.memory: the model of memory per device, and the figure written beside every recipe
(configs/llama2_*.yaml) equals what it computes for that recipe."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from msplora.memory import GIB, KNOWN_SHAPES, Shape, estimate, estimate_fit
from msplora.training.cli import cli_main
from msplora.training.module import MSPLoRAModule
from tests.conftest import REPO

CONFIGS = REPO / "configs"
PAPER = [{"share": "global", "rank": 64}, {"share": "group", "rank": 32, "groups": 3}, {"share": "layer", "rank": 16}]
RECIPES = {  # recipe -> the configs it composes
    "llama2_7b_alpaca.yaml": ["base.yaml", "llama2_7b_alpaca.yaml"],
    "llama2_13b_alpaca_fsdp.yaml": ["base.yaml", "llama2_7b_alpaca.yaml", "llama2_13b_alpaca_fsdp.yaml"],
    "llama2_70b_alpaca_fsdp.yaml": ["base.yaml", "llama2_7b_alpaca.yaml", "llama2_70b_alpaca_fsdp.yaml"],
    "llama2_70b_alpaca_qlora.yaml": ["base.yaml", "llama2_7b_alpaca.yaml", "llama2_70b_alpaca_qlora.yaml"],
}
WRITTEN = re.compile(r"^# memory per device \(msplora\.memory\): ([\d.]+) GiB on (?:each of )?(\d+) GPUs?", re.M)


def test_every_llama_recipe_is_listed_here():
    assert sorted(p.name for p in CONFIGS.glob("llama2_*.yaml")) == sorted(RECIPES)


def test_shapes_count_the_published_parameters():
    """LLaMA-2 7B / 13B / 70B have 6,738,415,616 / 13,015,864,320 / 68,976,648,192 parameters;
    a small GQA shape is counted as transformers builds it."""
    counts = {k.split("-")[3]: s.params for k, s in KNOWN_SHAPES.items()}
    assert counts == {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert Shape.from_config(config).params == sum(p.numel() for p in model.parameters())


def test_the_estimate_moves_the_way_each_setting_says():
    s = KNOWN_SHAPES["meta-llama/Llama-2-70b-hf"]
    ddp = estimate(s, PAPER, ["q_proj", "v_proj"], micro_batch=4)
    fsdp8 = estimate(s, PAPER, ["q_proj", "v_proj"], strategy="fsdp", devices=8, micro_batch=4)
    fsdp4 = estimate(s, PAPER, ["q_proj", "v_proj"], strategy="fsdp", devices=4, micro_batch=4)
    ckpt = estimate(
        s, PAPER, ["q_proj", "v_proj"], strategy="fsdp", devices=8, micro_batch=4, gradient_checkpointing=True
    )
    nf4 = estimate(s, PAPER, ["q_proj", "v_proj"], micro_batch=4, quantize="nf4")
    assert ddp.parts["base weights"] == pytest.approx(s.params * 2)  # a whole bf16 copy
    assert fsdp8.parts["base weights"] == pytest.approx(s.params * 2 / 8)
    assert ddp.total > fsdp4.total > fsdp8.total
    assert ckpt.parts["activations"] < fsdp8.parts["activations"] / 10
    assert 0.25 < nf4.parts["base weights"] / ddp.parts["base weights"] < 0.3  # 4.13 of 16 bits, + bf16 embeddings
    # the adapter: sum_k r_k (d_in + d_out) cells_k, 4 bytes + 12 of grad and moments per weight
    n = 80 * 16 * (8192 + 8192 + 8192 + 1024) + 3 * 32 * (2 * 8192 + 8192 + 1024) + 64 * (2 * 8192 + 8192 + 1024)
    assert ddp.parts["adapter + AdamW"] == 16 * n
    with pytest.raises(ValueError, match="strategy"):
        estimate(s, PAPER, ["q_proj"], strategy="zero3")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_parses_and_its_written_memory_is_the_computed_one(recipe):
    if "quantize" in (CONFIGS / recipe).read_text() and "quantize" not in inspect.signature(MSPLoRAModule).parameters:
        pytest.skip("needs model.quantize (quantized bases, another change in flight)")
    args = [a for name in RECIPES[recipe] for a in ("--config", str(CONFIGS / name))]
    cli = cli_main([*args, "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False)
    t, dm = cli.trainer, cli.datamodule
    assert dm.batch_size * t.accumulate_grad_batches * t.num_devices == 128  # the paper's effective batch
    assert cli.model.model is None  # parsing loads nothing
    written = WRITTEN.findall((CONFIGS / recipe).read_text())
    assert len(written) == 1, f"{recipe}: no (or several) '# memory per device (msplora.memory): X GiB on N GPU' line"
    gib, devices = written[0]
    est = estimate_fit(cli)
    assert int(devices) == t.num_devices
    assert float(gib) == est.gib, f"{recipe} says {gib} GiB, msplora.memory computes {est.total / GIB:.2f}"
    if "fsdp" in recipe:
        from msplora.training.fsdp import PyramidFSDPStrategy

        assert isinstance(t.strategy, PyramidFSDPStrategy) and cli.model.hparams.gradient_checkpointing


def test_memory_command_prints_a_recipes_figure_and_refuses_a_non_llama_fit_in_one_line(capsys):
    from msplora.memory import main

    recipe = RECIPES["llama2_70b_alpaca_fsdp.yaml"]
    assert main([a for name in recipe for a in ("--config", str(CONFIGS / name))]) == 0
    out = capsys.readouterr().out
    assert "gathered units" in out and out.strip().splitlines()[-1] == "memory per device: 23.3 GiB"
    assert main(["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "demo.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msplora.memory: targets: ['query', 'value'] are not LLaMA projections")
    assert "Fix:" in err[-1]
