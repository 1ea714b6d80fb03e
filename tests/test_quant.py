"""Quantized bases (QLoRA-style): the pyramid on bitsandbytes 4-bit (nf4, fp4) and 8-bit linears.

What must hold: the quantized maps are found and wrapped with their true (d_in, d_out), stay
frozen and byte-identical through training, the adapter computes in fp32 beside them, at init the
output is the quantized base's, adapters save and reload exactly, a merge re-quantises and says by
how much (unmerge restores the quantized weight bit for bit), peft's door and `msplora fit`'s
``model.quantize`` key work, and the core never imports bitsandbytes on its own.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes (pip install 'msplora[quant]')")

import msplora  # noqa: E402
from msplora import ConfigError, Level, MSPLoRAConfig  # noqa: E402
from msplora.quant import (  # noqa: E402
    RequantizationWarning,
    dequantize,
    import_bnb,
    keep_trainable_layout,
    quantization_config,
)
from tests.conftest import REPO  # noqa: E402
from tests.tiny import assert_same, inputs, randomize_adapter, snapshot, tiny_bert, tiny_llama  # noqa: E402

QUANT = ["nf4", "fp4", "int8"]
LEVELS = [Level("global", 4), Level("group", 2, groups=2), Level("layer", 2)]
# name -> (factory, transformers auto class, targets, heads that train)
MODELS = {
    "bert": (tiny_bert, "AutoModelForSequenceClassification", ["query", "value"], ["classifier"]),
    "llama": (tiny_llama, "AutoModelForCausalLM", ["q_proj", "v_proj"], []),
}
QLINEAR = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The tiny random models as local folders, to load quantized as from_pretrained does."""
    out = {}
    for name, (factory, *_) in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        factory().save_pretrained(folder)
        out[name] = folder
    return out


def load(saved: dict, name: str, quant: str, dtype: torch.dtype = torch.float32, guard: bool = True):
    """The tiny model loaded through transformers' BitsAndBytesConfig, in eval mode; ``guard``:
    with every 4-bit layer in its trainable layout (as `inject` leaves it), so base outputs compare."""
    import transformers

    _, auto, _, heads = MODELS[name]
    qc = quantization_config(quant, dtype, skip=heads or None)
    model = getattr(transformers, auto).from_pretrained(saved[name], quantization_config=qc, dtype=dtype).eval()
    if guard:
        keep_trainable_layout(model)
    return model


def config(name: str, dropout: float = 0.0) -> MSPLoRAConfig:
    _, _, targets, heads = MODELS[name]
    return MSPLoRAConfig(targets=targets, levels=LEVELS, dropout=dropout, modules_to_save=heads)


def qweights(model) -> dict[str, torch.Tensor]:
    """The raw bytes of every quantized weight and its quantization statistics (4-bit: absmax,
    code, ...; 8-bit: row scales), by name."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            for k, v in mod.state_dict().items():
                out[f"{name}.{k}"] = v.detach().reshape(-1).view(torch.uint8).clone()
    return out


def out(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("name", list(MODELS))
def test_a_quantized_base_is_wrapped_frozen_and_starts_as_the_base(saved, name, quant):
    model = load(saved, name, quant)
    x = inputs()
    base = out(model, x)
    msplora.inject(model, config(name))
    layers = dict(msplora.wrapped_layers(model))
    assert len(layers) == 2 * 4
    for layer in layers.values():
        assert type(layer.base_layer).__name__ == QLINEAR[quant] and layer.quantized
        assert not layer.base_layer.weight.requires_grad
    bank = msplora.get_bank(model)
    for kind, kb in bank.kinds.items():  # (d_in, d_out) from the layer, not the packed weight's shape
        first = next(layer for layer in layers.values() if layer.kind == kind).base_layer
        assert (kb.d_in, kb.d_out) == (first.in_features, first.out_features)
        assert kb.A.dtype == kb.B.dtype == torch.float32
    if quant != "int8":
        assert first.weight.shape[1] == 1  # packed: (d_in * d_out / 2, 1), which is why
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = MODELS[name][3]
    assert trainable and all(n.startswith("msplora_bank.") or n.split(".")[0] in heads for n in trainable)
    assert msplora.adapter_parameters(model) == sum(  # the parameter formula, shapes from the layers
        lv.rank * kb.n_cells[k] * (kb.d_in + kb.d_out) for kb in bank.kinds.values() for k, lv in enumerate(kb.levels)
    )
    assert torch.equal(out(model, x), base)  # B = 0: exactly the quantized base


@pytest.mark.parametrize("quant", QUANT)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_moves_the_adapter_and_never_the_quantized_weights(saved, name, quant):
    model = msplora.inject(load(saved, name, quant), config(name, dropout=0.05))
    before_q = qweights(model)
    bank = msplora.get_bank(model)
    before_ab = {n: p.detach().clone() for n, p in bank.named_parameters()}
    x = inputs(batch=4)
    labels = torch.tensor([0, 1, 0, 1]) if name == "bert" else x["input_ids"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**x, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in bank.named_parameters():
        assert not torch.equal(p, before_ab[n]), f"{n} did not train"
    after_q = qweights(model)
    assert after_q.keys() == before_q.keys() and all(torch.equal(after_q[k], before_q[k]) for k in before_q)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_gradient_reaches_the_first_layer_after_an_eval_pass(tmp_path, quant):
    """bnb 0.50 repacks a 4-bit weight for a CPU inference kernel without a backward on the first
    eval, no-grad forward (on CPUs with AVX512-BF16) and keeps it: without inject's guard, the
    adapter below the last quantized layer would get no gradient after a validation pass. (Width
    64: at 32 that kernel fails outright.)"""
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    model = msplora.inject(load({"llama": tmp_path}, "llama", quant, guard=False), config("llama"))
    x = inputs()
    out(model, x)  # eval, no grad: a validation pass
    model.train()
    model(**x, labels=x["input_ids"]).loss.backward()
    for kind, kb in msplora.get_bank(model).kinds.items():
        assert kb.B.grad is not None, f"no gradient reached {kind}"
        k = [lv.name for lv in kb.levels].index("layer")
        g = kb.B.grad[:, kb.offsets[k] : kb.offsets[k] + kb.levels[k].rank]  # layer 0's cell
        assert g.abs().sum() > 0, f"no gradient reached layer 0's {kind}"


def test_the_adapter_term_is_computed_in_fp32_beside_a_bf16_4bit_base(saved):
    model = msplora.inject(load(saved, "llama", "nf4", dtype=torch.bfloat16), config("llama"))
    randomize_adapter(model)
    layer = next(layer for _, layer in msplora.wrapped_layers(model))
    assert layer.bank.A.dtype == torch.float32
    x = torch.randn(3, 5, layer.bank.d_in, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
        a, b, s = layer.bank.gather(layer.rows)
        fp32 = F.linear(F.linear(x.float(), a) * s, b)  # (3, 5, d_out) in fp32, rounded once
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, layer.base_layer(x) + fp32.to(torch.bfloat16))
        bf16 = F.linear(F.linear(x, a.bfloat16()) * s.bfloat16(), b.bfloat16())
        assert not torch.equal(got, layer.base_layer(x) + bf16)  # so the check above can tell


@pytest.mark.parametrize("quant", QUANT)
def test_save_load_round_trip_on_a_quantized_base(saved, tmp_path, quant):
    model = msplora.inject(load(saved, "bert", quant), config("bert"))
    randomize_adapter(model)
    x = inputs()
    ref = out(model, x)
    msplora.save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys and all(k.split(".")[0] in ("global", "mid", "layer", "modules_to_save") for k in keys)
    assert not any("base_layer" in k or "absmax" in k or "SCB" in k for k in keys)  # adapter tensors only
    fresh = msplora.load_adapter(load(saved, "bert", quant), tmp_path / "a")
    assert torch.equal(out(fresh, x), ref)


def _merge(model) -> float:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msplora.merge(model)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RequantizationWarning)]
    assert len(msgs) == 1, msgs  # once per merge, not once per layer
    return float(msgs[0].split("adds up to ")[1].split(" ")[0])


@pytest.mark.parametrize("quant", QUANT)
def test_merge_requantises_says_by_how_much_and_unmerge_is_exact(saved, quant):
    model = msplora.inject(load(saved, "llama", quant), config("llama"))
    randomize_adapter(model)
    with torch.no_grad():  # a delta of about a third of the largest weight, not 0.3 * 0.3 * rank
        for kb in msplora.get_bank(model).kinds.values():
            kb.B.mul_(0.002)
    x = inputs()
    with msplora.disable_adapters(model):
        base = out(model, x)
    unmerged = out(model, x)
    layers = [layer for _, layer in msplora.wrapped_layers(model)]
    deq_before = [dequantize(layer.base_layer) for layer in layers]
    exact = [w + layer.delta_weight().detach().float() for w, layer in zip(deq_before, layers)]
    q_before = qweights(model)

    warned = _merge(model)
    assert all(layer.merged for layer in layers)
    errors = [float((dequantize(layer.base_layer) - e).abs().max()) for layer, e in zip(layers, exact)]
    assert [layer.merge_error for layer in layers] == errors  # what each layer reports is what it is
    assert warned == pytest.approx(max(errors), rel=1e-2) and warned > 0  # the warning quotes the worst
    merged = out(model, x)
    # The rounding shows in the output; int8 keeps the adapter's effect to a few percent, 4-bit
    # loses much of it (measured here: 0.09 of 0.15 for nf4, 0.004 of 0.13 for int8), but the
    # merged model is still nearer the adapted one than the base is.
    lost, effect = (merged - unmerged).abs().max(), (unmerged - base).abs().max()
    assert 0 < lost < (0.1 if quant == "int8" else 1.0) * effect
    msplora.merge(model)  # idempotent: nothing merged twice
    assert torch.equal(out(model, x), merged)

    with msplora.disable_adapters(model):  # the quantized base, then back to the merged weights
        assert torch.equal(out(model, x), base)
    assert torch.equal(out(model, x), merged) and all(layer.merged for layer in layers)
    with torch.no_grad():
        for kb in msplora.get_bank(model).kinds.values():
            kb.B.zero_()
    msplora.unmerge(model)  # restores the pre-merge quantized weights bit for bit (no second rounding)
    after = qweights(model)
    assert after.keys() == q_before.keys() and all(torch.equal(after[k], q_before[k]) for k in q_before)
    assert torch.equal(out(model, x), base)


def test_load_adapter_into_a_merged_quantized_model_warns_of_the_new_rounding(saved, tmp_path):
    """load_adapter on a merged model re-merges the new delta: on a quantized base that rounds
    again, so it warns as merge does (once), and unmerge still gives back the original bytes."""
    model = msplora.inject(load(saved, "llama", "nf4"), config("llama"))
    randomize_adapter(model, seed=3)
    msplora.save_adapter(model, tmp_path / "other")
    randomize_adapter(model, seed=2)
    q_before = qweights(model)
    _merge(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msplora.load_adapter(model, tmp_path / "other")
    assert len([w for w in caught if issubclass(w.category, RequantizationWarning)]) == 1
    layers = [layer for _, layer in msplora.wrapped_layers(model)]
    assert all(layer.merged and layer.merge_error > 0 for layer in layers)
    msplora.unmerge(model)
    after = qweights(model)
    assert after.keys() == q_before.keys() and all(torch.equal(after[k], q_before[k]) for k in q_before)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unload_gives_the_plain_quantized_model(saved, quant):
    model = msplora.inject(load(saved, "llama", quant), config("llama"))
    randomize_adapter(model)
    x = inputs()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        msplora.merge(reference)
        plain = msplora.merge_and_unload(model)
    assert not list(msplora.wrapped_layers(plain)) and msplora.get_bank(plain, required=False) is None
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == QLINEAR[quant]
    assert torch.equal(out(plain, x), out(reference, x))  # the same re-quantised weights


def test_a_refused_safe_merge_leaves_the_quantized_model_as_it_was(saved):
    model = msplora.inject(load(saved, "llama", "nf4"), config("llama"))
    randomize_adapter(model)
    with torch.no_grad():
        msplora.get_bank(model).kinds["v_proj"].B[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ConfigError, match="non-finite.*nothing was merged"):
        msplora.merge(model, safe=True)
    assert_same(before, snapshot(model))
    with pytest.raises(ConfigError, match="non-finite"):
        msplora.merge_and_unload(model, safe=True)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_peft_get_peft_model_on_a_quantized_base(saved, quant):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from msplora.peft import MSPLoRAPeftConfig

    base = load(saved, "llama", quant)
    x = inputs()
    ref_base = out(base, x)
    pm = get_peft_model(
        copy.deepcopy(base), MSPLoRAPeftConfig(targets=["q_proj", "v_proj"], task_type="CAUSAL_LM", dropout=0.0)
    )
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("msplora_bank" in n for n in trainable)
    assert torch.equal(out(pm, x), ref_base)
    q_before = qweights(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    pm(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    assert not torch.equal(out(pm, x), ref_base)
    after = qweights(pm)
    assert all(torch.equal(after[k], q_before[k]) for k in q_before)


def test_quantize_values_and_a_missing_bitsandbytes_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"model.quantize: 'int4' is not one of .*Fix:"):
        quantization_config("int4", torch.float32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ConfigError, match=r"model.quantize: .*needs bitsandbytes.*Fix: pip install 'msplora\[quant\]'"):
        import_bnb()


def test_the_core_never_imports_bitsandbytes():
    script = (
        "import sys, torch, msplora\n"
        "from tests.tiny import tiny_bert\n"
        "m = msplora.inject(tiny_bert(), msplora.MSPLoRAConfig(targets=['query', 'value']))\n"
        "msplora.merge(m); msplora.unmerge(m); m(input_ids=torch.ones(1, 3, dtype=torch.long))\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_msplora_fit_trains_a_4bit_base(tmp_path, tiny_bert_dir):
    """`msplora fit` with ``model.quantize: nf4`` (through the run API): the backbone's linears load
    as 4-bit, the head does not, and every layer's adapter cell trains: Lightning's sanity
    validation (an eval, no-grad pass) runs first, so this also checks inject's layout guard."""
    from safetensors.torch import load_file

    from msplora.training.run import compose, fit
    from tests.test_run_api import BASE, tiny

    overrides = {**tiny(tiny_bert_dir), "model.quantize": "nf4", "trainer.max_epochs": 1}
    setup = compose([BASE], overrides, root_dir=tmp_path)
    result = fit(setup)
    model = setup.model.model
    assert result.global_step == 4 and result.value is not None
    assert {type(m).__name__ for m in model.bert.encoder.modules()} >= {"Linear4bit", "MSPLoRALinear"}
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad
    assert all(layer.quantized for _, layer in msplora.wrapped_layers(model))
    saved = load_file(result.best_adapter / "adapter_model.safetensors")
    for kind in ("query", "value"):
        b = saved[f"layer.{kind}.B"]  # (cells = layers, d_out, r): B starts at 0
        assert all(b[c].abs().sum() > 0 for c in range(b.shape[0])), f"a layer's {kind} cell did not train"
    # `msplora export --to merged` rebuilds the base unquantized: an exact merge, a plain model.
    from transformers import AutoModelForSequenceClassification

    from msplora.export_cli import export_run

    plain = AutoModelForSequenceClassification.from_pretrained(export_run(result.run_dir, "merged", tmp_path / "m"))
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear


def test_a_bad_quantize_value_is_refused_before_the_fit(tmp_path, tiny_bert_dir):
    from msplora.errors import UsageError
    from msplora.training.run import compose
    from tests.test_run_api import BASE, tiny

    with pytest.raises(UsageError, match="quantize"):
        compose([BASE], {**tiny(tiny_bert_dir), "model.quantize": "int4"}, root_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_fit_without_bitsandbytes_is_one_line_and_writes_nothing(tmp_path, tiny_bert_dir, monkeypatch):
    from msplora.training.run import compose, fit
    from tests.test_run_api import BASE, tiny

    setup = compose([BASE], {**tiny(tiny_bert_dir), "model.quantize": "int8"}, root_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*Fix: pip install 'msplora\[quant\]'"):
        fit(setup)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == []
