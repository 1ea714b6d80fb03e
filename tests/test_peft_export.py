"""The peft door outwards: a pyramid trained through peft (get_peft_model, transformers.Trainer)
becomes a plain LoRA folder with the head, a merged model or an msplora adapter; and the peft
config speaks LoRA's names (target_modules, all-linear, per-architecture defaults, r)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import stat

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import msplora
from msplora import ConfigError, MSPLoRAConfig
from msplora.__main__ import main as msplora_main
from msplora.peft import PEFT_TYPE, MSPLoRAPeftConfig, to_core_model
from tests.tiny import inputs, logits, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    """Equal to float rounding, relative to the logits' scale (s_k folded into B rounds
    differently); a wrong or missing head or adapter is off by far more."""
    assert (a - b).abs().max() <= rel * b.abs().max(), ((a - b).abs().max(), b.abs().max())


def _status(argv: list[str]) -> int:
    try:
        return msplora_main(argv)
    except SystemExit as e:
        return e.code


# -- the config -----------------------------------------------------------------------------------
def test_peft_config_fields_are_the_core_fields_plus_peft_and_lora_names():
    core = {f.name for f in dataclasses.fields(MSPLoRAConfig)}
    peft_base = {f.name for f in dataclasses.fields(PeftConfig)}
    ours = {f.name for f in dataclasses.fields(MSPLoRAPeftConfig)}
    assert core <= ours  # scale_rule, lr_rule, lr_ratio_B, budget_of, ... included
    assert ours - core - peft_base == {"target_modules", "r", "lora_alpha", "lora_dropout"}
    # same defaults, except targets (None: the architecture's q/v, as peft's LoRA)
    defaults = {f.name: (f.default, f.default_factory) for f in dataclasses.fields(MSPLoRAConfig)}
    for f in dataclasses.fields(MSPLoRAPeftConfig):
        if f.name in core and f.name != "targets":
            assert (f.default, f.default_factory) == defaults[f.name], f.name
    cfg = MSPLoRAPeftConfig(target_modules=["query"], scale_rule="rslora", lr_rule="layers", lr_ratio_B=4.0)
    core_cfg = cfg.to_msplora()
    assert (core_cfg.scale_rule, core_cfg.lr_rule, core_cfg.lr_ratio_B) == ("rslora", "layers", 4.0)
    assert MSPLoRAPeftConfig.from_msplora(MSPLoRAConfig(lr_ratio_B=2.0)).to_msplora() == MSPLoRAConfig(lr_ratio_B=2.0)


def test_peft_type_is_a_string_and_the_enum_is_untouched(tmp_path):
    assert PEFT_TYPE == "MSPLORA" and "MSPLORA" not in PeftType.__members__
    cfg = MSPLoRAPeftConfig(target_modules=["query", "value"], task_type="SEQ_CLS")
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MSPLORA"


def test_lora_names_map_onto_the_pyramid():
    cfg = MSPLoRAPeftConfig(target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32, lora_dropout=0.1)
    assert cfg.targets == cfg.target_modules == ["q_proj", "v_proj"]
    assert [lv.rank for lv in cfg.levels] == [16, 8, 4] and {lv.alpha for lv in cfg.levels} == {32}
    assert cfg.dropout == 0.1 and cfg.r is None and cfg.lora_alpha is None  # folded in, one source of truth
    for kwargs, needle in [
        (dict(targets=["query"], target_modules=["value"]), "target_modules.*give one of them"),
        (dict(r=8, r0=4), "r: given with ranks / r0"),
        (dict(lora_dropout=0.2, dropout=0.3), "lora_dropout.*give one of them"),
        (dict(r=0), "r0"),
    ]:
        with pytest.raises(ConfigError, match=f"{needle}.*|Fix"):
            MSPLoRAPeftConfig(**kwargs)


def test_default_targets_per_architecture_and_all_linear():
    for factory, task, want in (
        (tiny_llama, "CAUSAL_LM", {"q_proj", "v_proj"}),
        (tiny_bert, "SEQ_CLS", {"query", "value"}),
        (tiny_gpt2, "CAUSAL_LM", {"c_attn"}),
    ):
        pm = get_peft_model(factory(), MSPLoRAPeftConfig(task_type=task))
        assert set(msplora.get_bank(pm.get_base_model()).kinds) == want
        assert set(pm.peft_config["default"].target_modules) == want  # saved as LoRA saves its defaults
    pm = get_peft_model(tiny_llama(), MSPLoRAPeftConfig(target_modules="all-linear", task_type="CAUSAL_LM"))
    kinds = msplora.get_bank(pm.get_base_model()).kinds
    assert set(kinds) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(len(kb.layer_ids) == 4 for kb in kinds.values())
    assert not any("lm_head" in n for n, _ in msplora.wrapped_layers(pm.get_base_model()))
    pm = get_peft_model(tiny_bert(), MSPLoRAPeftConfig(target_modules="ALL-LINEAR", task_type="SEQ_CLS"))
    wrapped = [n for n, _ in msplora.wrapped_layers(pm.get_base_model())]
    assert len(wrapped) == 6 * 4 and not any("pooler" in n or "classifier" in n for n in wrapped)
    from torch import nn

    class Plain(nn.Module):  # no model_type: no default, one line saying what to set
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="no default targets.*Fix: set target_modules"):
        get_peft_model(Plain(), MSPLoRAPeftConfig())


# -- export of a PeftModel --------------------------------------------------------------------------
def _trained_peft(base, **cfg):
    pm = get_peft_model(copy.deepcopy(base), MSPLoRAPeftConfig(task_type="SEQ_CLS", **cfg))
    randomize_adapter(pm.get_base_model())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    return pm.eval()


@pytest.mark.parametrize("target_modules", [None, "all-linear"])
def test_export_peft_of_a_peft_model_and_of_its_base_model(tmp_path, target_modules):
    folder = tmp_path / "base"
    tiny_bert().save_pretrained(folder)
    base = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    pm = _trained_peft(base, target_modules=target_modules)
    x = inputs()
    with torch.no_grad():
        expected, bare = logits(pm, x), logits(base, x)
    for i, model in enumerate((pm, pm.get_base_model())):
        msplora.export_peft(model, tmp_path / f"lora{i}")
        cfg = json.loads((tmp_path / f"lora{i}" / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
        state = load_file(tmp_path / f"lora{i}" / "adapter_model.safetensors")
        assert not any(k.startswith("base_model.model.base_model.") for k in state)  # not nested under peft's wrapper
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= state.keys()
        auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / f"lora{i}").eval()
        with torch.no_grad():
            got = logits(auto, x)
        close(got, expected)
        assert (got - bare).abs().max() > 100 * 1e-6 * expected.abs().max()  # the adapter and head did act


def test_export_refuses_what_a_lora_folder_would_get_wrong(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(ConfigError, match="peft LORA adapter, not an MSPLoRA one.*Fix"):
        msplora.export_peft(lora, tmp_path / "x")
    pm = _trained_peft(tiny_bert())
    pm.merge_adapter()
    with pytest.raises(ConfigError, match="merged into the base weights.*Fix: unmerge"):
        msplora.export_peft(pm, tmp_path / "x")
    core = msplora.inject(tiny_bert(), MSPLoRAConfig())
    msplora.merge(core)
    with pytest.raises(ConfigError, match="merged into the base weights"):
        msplora.export_peft(core, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_to_core_model_keeps_adapter_and_head_for_save_adapter(tmp_path):
    base = tiny_bert()
    pm = _trained_peft(base)
    x = inputs()
    with torch.no_grad():
        expected = logits(pm, x)
    # straight from the PeftModel the head would be left out: refused in one line, nothing written
    with pytest.raises(ConfigError, match="peft model.*Fix: .*to_core_model"):
        msplora.save_adapter(pm, tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    core = to_core_model(pm)
    assert msplora.get_bank(core).config.modules_to_save == ["classifier"]
    msplora.save_adapter(core, tmp_path / "ad")
    fresh = msplora.load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()
    with torch.no_grad():
        assert torch.equal(logits(fresh, x), expected)


def test_adapter_folders_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        msplora.save_adapter(msplora.inject(tiny_bert(), MSPLoRAConfig()), tmp_path / "ad")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ad").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ad").iterdir()} == {0o644}


# -- done when: transformers.Trainer through get_peft_model -> a plain LoRA folder ------------------
class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, length: int = 8, labels: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 100, (n, length), generator=g)
        self.labels = torch.randint(0, labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


@pytest.mark.slow
def test_trainer_checkpoint_exports_to_plain_lora_with_identical_logits(tmp_path):
    from transformers import Trainer, TrainingArguments

    from msplora.optim import create_optimizer

    folder = tmp_path / "base"  # a plain backbone without a head, as a hub model: 3 labels are the user's
    torch.manual_seed(0)
    BertModel(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(folder)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    cfg = MSPLoRAPeftConfig(target_modules=["query", "value"], r=8, lora_alpha=16, lr_ratio_B=4.0, task_type="SEQ_CLS")
    pm = get_peft_model(base, cfg)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
    )
    opt = create_optimizer(pm, lr=1e-2)
    Trainer(model=pm, args=args, train_dataset=Batches(), optimizers=(opt, None)).train()
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "MSPLORA"
    pm.eval()
    x = {"input_ids": Batches().ids[:4]}
    with torch.no_grad():
        expected = logits(pm, x)

    msplora.export_peft(pm, tmp_path / "direct")
    for to in ("peft", "merged", "msplora"):
        assert _status(["export", str(ckpt), "--to", to, str(tmp_path / to)]) == 0
    for out in ("direct", "peft"):
        # offline: a local base; a base without a head needs num_labels, as for any peft LoRA
        auto = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / out, num_labels=3).eval()
        with torch.no_grad():
            close(logits(auto, x), expected)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    fresh = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    msplora.load_adapter(fresh, tmp_path / "msplora").eval()
    with torch.no_grad():
        close(logits(merged, x), expected)
        assert torch.equal(logits(fresh, x), expected)
    # the Trainer's output folder itself: one line naming the checkpoint to pass
    assert _status(["export", str(tmp_path / "out"), "--to", "peft", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_export_of_a_plain_lora_folder_or_nothing_is_one_line(tmp_path, capsys):
    from peft import LoraConfig

    get_peft_model(tiny_bert(), LoraConfig(target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(
        tmp_path / "lora"
    )
    for src, needle in (
        (tmp_path / "lora", "peft LORA adapter, not an MSPLoRA one"),
        (tmp_path / "none", "is not a folder"),
    ):
        assert _status(["export", str(src), "--to", "merged", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Fix:" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_all_linear_and_default_targets_round_trip_through_save_pretrained(tmp_path):
    base = tiny_llama()
    x = inputs()
    for i, targets in enumerate(("all-linear", None)):
        pm = get_peft_model(copy.deepcopy(base), MSPLoRAPeftConfig(target_modules=targets, task_type="CAUSAL_LM"))
        randomize_adapter(pm.get_base_model())
        pm.eval().save_pretrained(tmp_path / f"ad{i}")
        saved = json.loads((tmp_path / f"ad{i}" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "MSPLORA" and saved["targets"] == saved["target_modules"]
        assert saved["targets"] == ("all-linear" if targets else ["q_proj", "v_proj"])
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"ad{i}").eval()
        with torch.no_grad():
            assert torch.equal(logits(loaded, x), logits(pm, x))
