"""MSPLoRA through peft's front door, and exports that peft / transformers load.

One table of tiny models (BERT: nn.Linear + a head; LLaMA: grouped-query shapes; GPT-2:
Conv1D) drives the checks: the peft path equals the inject path bit for bit, save / load
round trips, AutoPeftModel loading, merged == unmerged, and the save_pretrained trap.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat
import struct

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftConfig,
    PeftModel,
    get_peft_model,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import msplora
from msplora import ConfigError, MSPLoRAConfig
from msplora.export import public_model_name
from msplora.inject import adapter_state_dict
from msplora.peft import MSPLoRAPeftConfig, MSPLoRAPeftLayer
from tests.tiny import inputs, logits, randomize_adapter, tiny_bert, tiny_gpt2, tiny_llama

# name -> (factory, targets, heads, peft task type, AutoPeftModel class, transformers auto class)
CASES = {
    "bert": (tiny_bert, ["query", "value"], ["classifier"], "SEQ_CLS", AutoPeftModelForSequenceClassification),
    "llama": (tiny_llama, ["q_proj", "v_proj"], [], "CAUSAL_LM", AutoPeftModelForCausalLM),
    "gpt2": (tiny_gpt2, ["c_attn"], [], "CAUSAL_LM", AutoPeftModelForCausalLM),
}
AUTO = {"SEQ_CLS": AutoModelForSequenceClassification, "CAUSAL_LM": AutoModelForCausalLM}


def peft_model(name: str, base=None, dropout: float = 0.0):
    factory, targets, _, task, _ = CASES[name]
    base = factory() if base is None else base
    return get_peft_model(copy.deepcopy(base), MSPLoRAPeftConfig(targets=targets, task_type=task, dropout=dropout))


def injected(name: str, base, dropout: float = 0.0):
    _, targets, heads, _, _ = CASES[name]
    model = copy.deepcopy(base)
    return msplora.inject(model, MSPLoRAConfig(targets=targets, modules_to_save=heads, dropout=dropout))


def saved_base(name: str, tmp_path):
    """The tiny base as a local folder (never downloaded), and the model loaded from it."""
    folder = tmp_path / f"{name}_base"
    CASES[name][0]().save_pretrained(folder)
    return folder, AUTO[CASES[name][3]].from_pretrained(folder).eval()


def bank_of(model):
    return msplora.get_bank(model.get_base_model() if isinstance(model, PeftModel) else model)


@torch.no_grad()
def copy_bank(src, dst) -> None:
    for kind, kb in bank_of(src).kinds.items():
        bank_of(dst).kinds[kind].A.copy_(kb.A)
        bank_of(dst).kinds[kind].B.copy_(kb.B)


@torch.no_grad()
def perturb_peft_heads(pm) -> None:
    """The head copy peft trains (ModulesToSaveWrapper) must travel with the adapter."""
    for n, p in pm.named_parameters():
        if ".modules_to_save." in n:
            p.add_(torch.randn_like(p))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the peft door is the inject door -------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_get_peft_model_equals_inject(name):
    base = CASES[name][0]()
    core = injected(name, base)
    randomize_adapter(core)
    pm = peft_model(name, base).eval()
    assert all(p.requires_grad for p in bank_of(pm).parameters())
    copy_bank(core, pm)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(logits(pm, x), logits(core, x))  # the same code on the same weights: bit-identical
    # each shared tensor counted once: peft's count == the core's (adapter + head)
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == msplora.trainable_parameters(core)
    assert sum(isinstance(m, MSPLoRAPeftLayer) for m in pm.modules()) == len(list(msplora.wrapped_layers(core)))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_peft_door_with_dropout_in_train_mode_equals_inject(name):
    """Same base, same A/B, same seed: the peft door draws the same masks as inject(dropout=p)
    (base dropout included), so train-mode outputs are bit-identical; another seed differs."""
    p = 0.3
    base = CASES[name][0]()
    core = injected(name, base, dropout=p)
    randomize_adapter(core)
    pm = peft_model(name, base, dropout=p)
    copy_bank(core, pm)
    with torch.no_grad():
        for n, prm in pm.named_parameters():  # the head copy peft trains = the core's head
            if ".modules_to_save." in n:
                prm.copy_(core.get_parameter(n.split("base_model.model.")[1].replace(".modules_to_save.default", "")))
    core.train()
    pm.train()
    x = inputs()
    outs = []
    with torch.no_grad():
        for m, seed in ((core, 0), (pm, 0), (pm, 1)):
            torch.manual_seed(seed)
            outs.append(logits(m, x))
    assert torch.equal(outs[1], outs[0])
    assert not torch.allclose(outs[2], outs[0], atol=1e-3)


def test_config_has_the_core_fields_and_defaults(tmp_path):
    # every core default but targets (None: the architecture's q/v, resolved on the model)
    assert MSPLoRAPeftConfig(targets=["query", "value"]).to_msplora().to_dict() == MSPLoRAConfig().to_dict()
    cfg = MSPLoRAPeftConfig(targets=["q_proj"], r0=16, decay=0.25, dropout=0.1, task_type="CAUSAL_LM")
    assert [lv.rank for lv in cfg.levels] == [16, 4, 1] and cfg.r0 is None
    cfg.save_pretrained(tmp_path)
    again = PeftConfig.from_pretrained(tmp_path)  # peft finds the class from peft_type
    assert isinstance(again, MSPLoRAPeftConfig) and again.to_msplora() == cfg.to_msplora()
    with pytest.raises(ConfigError, match="dropout.*Fix"):
        MSPLoRAPeftConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"levels\[0\].rank"):
        MSPLoRAPeftConfig(levels=[{"share": "layer", "rank": 0}])


# -- save / load --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_save_load_round_trip_bit_exact_each_tensor_once(name, tmp_path):
    base = CASES[name][0]()
    pm = peft_model(name, base)
    randomize_adapter(pm.get_base_model())
    perturb_peft_heads(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(path)
    ours = {k.removeprefix("msplora."): v for k, v in state.items() if k.startswith("msplora.")}
    # one layout: the tensors are the core's save_adapter tensors, under the msplora. namespace
    core_state = adapter_state_dict(pm.get_base_model())
    assert ours.keys() == core_state.keys() and all(torch.equal(ours[k], core_state[k]) for k in ours)
    assert sum(v.numel() for v in ours.values()) == msplora.adapter_parameters(pm.get_base_model())
    # file size = every saved tensor once x 4 bytes + safetensors' 8-byte length + JSON header
    trainable, _ = pm.get_nb_trainable_parameters()
    assert sum(v.numel() for v in state.values()) == trainable
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header + 4 * trainable

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(logits(loaded, x), logits(pm, x))
    assert not any(p.requires_grad for p in loaded.parameters())  # peft's default: loaded for inference


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_auto_peft_model_loads_a_pyramid_saved_by_peft(name, tmp_path):
    folder, base = saved_base(name, tmp_path)
    pm = peft_model(name, base)
    assert pm.peft_config["default"].base_model_name_or_path == str(folder)
    randomize_adapter(pm.get_base_model())
    perturb_peft_heads(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "ad")
    auto = CASES[name][4].from_pretrained(tmp_path / "ad").eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(logits(auto, x), logits(pm, x))


# -- merge, unload, disable -------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_merge_unload_disable(name):
    base = CASES[name][0]()
    x = inputs()
    with torch.no_grad():
        base_out = logits(base, x)
        pm = peft_model(name, base)
        randomize_adapter(pm.get_base_model())
        pm.eval()
        adapted = logits(pm, x)
        assert not torch.allclose(adapted, base_out, atol=1e-3)
        with pm.disable_adapter():
            assert torch.equal(logits(pm, x), base_out)  # disabled = the base layer's own forward
        assert torch.equal(logits(pm, x), adapted)
        pm.merge_adapter()
        # merged vs unmerged: W + dW computed once vs W x + B(A x): float rounding, ~1e-7 here
        torch.testing.assert_close(logits(pm, x), adapted, atol=1e-5, rtol=1e-5)
        with pm.disable_adapter():
            torch.testing.assert_close(logits(pm, x), base_out, atol=1e-5, rtol=1e-5)
        pm.unmerge_adapter()
        plain = copy.deepcopy(pm).merge_and_unload()
        torch.testing.assert_close(logits(plain, x), adapted, atol=1e-5, rtol=1e-5)
        assert not hasattr(plain, "msplora_bank") and not any(isinstance(m, MSPLoRAPeftLayer) for m in plain.modules())
        assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in base.parameters())
        # merge then unmerge subtracts dW again: W back to float rounding, not bit for bit
        bare = pm.unload()
        torch.testing.assert_close(logits(bare, x), base_out, atol=1e-5, rtol=1e-5)
        assert not hasattr(bare, "msplora_bank") and not any(isinstance(m, MSPLoRAPeftLayer) for m in bare.modules())
        fresh = peft_model(name, base)
        randomize_adapter(fresh.get_base_model())
        assert torch.equal(logits(fresh.unload().eval(), x), base_out)  # never merged: W untouched


def test_second_adapter_is_refused_and_changes_nothing(tmp_path):
    pm = peft_model("bert")
    randomize_adapter(pm.get_base_model())
    pm.eval()
    x = inputs()
    before, out = snapshot(pm), logits(pm, x).detach()
    with pytest.raises(ConfigError, match="one adapter per model"):
        pm.add_adapter("other", MSPLoRAPeftConfig(task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "ad")
    with pytest.raises(ConfigError, match="one adapter per model"):
        pm.load_adapter(tmp_path / "ad", adapter_name="other")
    assert list(pm.peft_config) == ["default"]
    after = snapshot(pm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(logits(pm, x), out)


# -- the save_pretrained trap --------------------------------------------------------------------
def test_save_pretrained_of_an_injected_model_is_refused(tmp_path):
    base = tiny_bert()
    model = injected("bert", base)
    randomize_adapter(model)
    for m in (model, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies carry the refusal too
        with pytest.raises(ConfigError, match="save_pretrained: this model carries an MSPLoRA adapter") as e:
            m.save_pretrained(tmp_path / "trap")
        assert "merge_and_unload" in str(e.value) and "save_adapter" in str(e.value)
        assert not (tmp_path / "trap").exists()  # a refusal writes nothing
    x = inputs()
    with torch.no_grad():
        expected = logits(model, x)
    plain = msplora.merge_and_unload(model)
    plain.save_pretrained(tmp_path / "plain")  # allowed again once the adapter is merged away
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, x), expected, atol=1e-5, rtol=1e-5)
    # the peft door's base model carries the same refusal until merge_and_unload
    pm = peft_model("bert", base)
    with pytest.raises(ConfigError, match="save_adapter"):
        pm.get_base_model().save_pretrained(tmp_path / "trap")
    pm.merge_and_unload().save_pretrained(tmp_path / "plain2")
    assert (tmp_path / "plain2" / "config.json").exists()


# -- export_peft -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_export_peft_loads_with_auto_peft_model(name, tmp_path):
    folder, base = saved_base(name, tmp_path)
    model = injected(name, base)
    randomize_adapter(model)
    with torch.no_grad():
        for h in CASES[name][2]:
            for p in getattr(model, h).parameters():
                p.add_(torch.randn_like(p))
    old = os.umask(0o022)
    try:
        msplora.export_peft(model, tmp_path / "lora")
    finally:
        os.umask(old)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == CASES[name][3]
    assert cfg["base_model_name_or_path"] == str(folder)
    assert stat.S_IMODE((tmp_path / "lora").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "lora").iterdir()} == {0o644}
    auto = CASES[name][4].from_pretrained(tmp_path / "lora").eval()
    x = inputs()
    with torch.no_grad():
        # s_k folded into B changes the rounding of the sum of levels: float tolerance
        torch.testing.assert_close(logits(auto, x), logits(model, x), atol=1e-5, rtol=1e-5)


def test_export_peft_names_the_base_as_a_user_would(tmp_path, monkeypatch):
    assert public_model_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_model_name(str(tmp_path)) == str(tmp_path)  # a user's own folder stays
    assert public_model_name("") is None  # built from a config: no name, as peft writes it
    from msplora.hf import MODEL_ALIASES, MissingModelPackageError

    try:
        wheel = MODEL_ALIASES["minilm"].locate()
    except MissingModelPackageError:
        wheel = None
    if wheel is not None:  # the resolved alias (a folder inside the virtualenv) -> its public name
        assert public_model_name(str(wheel)) == "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.setenv("MSPLORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "other").mkdir(parents=True)
    with pytest.raises(ConfigError, match="inside a virtualenv or a cache.*Fix"):
        public_model_name(str(tmp_path / "cache" / "other"))
    model = injected("bert", tiny_bert())
    model.config.name_or_path = str(tmp_path / "cache" / "other")
    with pytest.raises(ConfigError, match="inside a virtualenv"):
        msplora.export_peft(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    msplora.export_peft(model, tmp_path / "lora", base_model="org/name")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/name"


def test_export_carries_dropout_and_train_mode_matches_peft_lora(tmp_path):
    """One dropout mask on x shared by all levels == peft LoRA's one lora_dropout on
    the rank-R input. Same RNG state -> same masks -> the same train-mode outputs."""
    base = tiny_bert()
    model = injected("bert", base, dropout=0.3)
    randomize_adapter(model)
    msplora.export_peft(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    model.train()
    lora.train()
    x = inputs()
    outs = []
    with torch.no_grad():
        for m, seed in ((model, 0), (lora, 0), (model, 1)):
            torch.manual_seed(seed)
            outs.append(logits(m, x))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)  # folded scale: rounding only
    assert not torch.allclose(outs[2], outs[0], atol=1e-3)  # the masks matter: another seed differs
    # adapter-level statistics over many masks: one layer, same inputs, same seeds
    core = next(layer for _, layer in msplora.wrapped_layers(model))
    plora = lora.get_base_model().get_submodule(next(n for n, _ in msplora.wrapped_layers(model)))
    xs = torch.randn(512, core.bank.d_in)
    torch.manual_seed(5)
    a = core(xs) - core.base_layer(xs)
    torch.manual_seed(5)
    b = plora(xs) - plora.base_layer(xs)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (a.var(0) > 0).all()


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    pm = peft_model("llama")
    randomize_adapter(pm.get_base_model())
    with torch.no_grad():
        bank_of(pm).kinds["v_proj"].B[0, 0] = float("inf")  # one layer's delta goes non-finite
    before = snapshot(pm)
    with pytest.raises(ConfigError, match="non-finite.*Fix"):
        pm.merge_and_unload(safe_merge=True)
    after = snapshot(pm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in pm.modules() if isinstance(m, MSPLoRAPeftLayer))


@pytest.mark.parametrize("name", CASES)
def test_export_peft_of_the_peft_door(name, tmp_path):
    """A PeftModel (Conv1D, GQA, a head) exports to a LoRA folder equal to it, keys not nested."""
    base = CASES[name][0]()
    pm = peft_model(name, base)
    randomize_adapter(pm.get_base_model())
    perturb_peft_heads(pm)
    pm.eval()
    msplora.export_peft(pm, tmp_path / "lora")
    assert not any(
        k.startswith("base_model.model.base_model.") for k in load_file(tmp_path / "lora" / "adapter_model.safetensors")
    )
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    x = inputs()
    with torch.no_grad():
        want = logits(pm, x)
        assert (logits(loaded, x) - want).abs().max() <= 1e-6 * want.abs().max()
