"""Numerics of the core beyond fp32 on CPU: injection on ``meta`` then materialised, a bf16
base with an fp32 bank (the LLaMA-2 recipe), and adapter dropout (one mask for all levels).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import msplora
from msplora import MSPLoRAConfig
from tests.tiny import VARIANTS, inputs, logits, randomize_adapter, tiny_bert, tiny_llama

LLAMA_TARGETS = ["q_proj", "v_proj"]


def llama_config(variant: str = "paper", dropout: float = 0.0) -> MSPLoRAConfig:
    return MSPLoRAConfig(targets=LLAMA_TARGETS, levels=copy.deepcopy(VARIANTS[variant]), dropout=dropout)


@torch.no_grad()
def copy_bank(src, dst) -> None:
    for kind, kb in src.msplora_bank.kinds.items():
        dst.msplora_bank.kinds[kind].A.copy_(kb.A)
        dst.msplora_bank.kinds[kind].B.copy_(kb.B)


# -- meta device ------------------------------------------------------------------------------
@torch.no_grad()
def load_base_tensors(model, base) -> None:
    """Copy every base parameter and buffer (persistent or not: to_empty left all of them
    uninitialised) into the injected model, whose wrapped weights sit under ``base_layer``."""
    src = dict(base.named_parameters()) | dict(base.named_buffers())
    dst = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in dst.items():
        plain = name.replace(".base_layer.", ".")
        if plain in src:
            t.copy_(src[plain])
        else:  # only the adapter's own tensors have no base counterpart
            assert name.startswith("msplora_bank.") or name.endswith(".rows"), name


def test_meta_injection_materialises_with_lora_init():
    # d_in 128 gives 1024-1536 samples per level block: the sample std of a uniform law then
    # has a relative standard error sqrt((kurtosis - 1) / (4 n)) = sqrt(0.8 / 4096) ~ 1.4 %,
    # so the 10 % tolerance below is ~7 standard errors, yet a wrong law (normal(0, 1/r),
    # bound sqrt(6/d_in) of kaiming a=0) misses it by far more.
    dims = dict(hidden_size=128, intermediate_size=256)
    with torch.device("meta"):
        model = tiny_llama(**dims)
    msplora.inject(model, llama_config())
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    base = tiny_llama(**dims)
    load_base_tensors(model, base)
    torch.manual_seed(0)
    msplora.reset_adapter(model)

    reference = msplora.inject(copy.deepcopy(base), llama_config())  # injected on CPU directly
    for (_, layer), (_, ref) in zip(msplora.wrapped_layers(model), msplora.wrapped_layers(reference), strict=True):
        assert torch.equal(layer.rows, ref.rows)  # rebuilt, not garbage
    for kind, kb in model.msplora_bank.kinds.items():
        assert torch.equal(kb.row_scale, reference.msplora_bank.kinds[kind].row_scale), kind  # rebuilt too
    for kind, kb in model.msplora_bank.kinds.items():
        assert torch.equal(kb.B, torch.zeros_like(kb.B)), kind
        bound = 1 / math.sqrt(kb.d_in)  # kaiming_uniform(a=sqrt(5)) on (r, d_in): gain sqrt(1/3) * sqrt(3 / d_in)
        for k, lv in enumerate(kb.levels):
            a = kb.level_block(k)[0].flatten()
            assert a.abs().max() <= bound, (kind, lv.name)
            assert a.abs().max() > 0.95 * bound  # P(all n >= 1024 draws inside 0.95 b) = 0.95^n < 1e-22
            std = bound / math.sqrt(3)  # a uniform law on [-b, b]
            assert abs(a.std().item() / std - 1) < 0.10, (kind, lv.name, a.std().item(), std)
            assert abs(a.mean().item()) < 5 * std / math.sqrt(a.numel())  # 5 standard errors
    x = inputs()
    with torch.no_grad():
        assert torch.equal(logits(model, x), logits(base, x))  # B = 0: the base model exactly


# -- bf16 base, fp32 bank -----------------------------------------------------------------------
def test_bf16_base_fp32_bank():
    fp32 = msplora.inject(tiny_llama(), llama_config())
    randomize_adapter(fp32)
    base_bf16 = tiny_llama().to(torch.bfloat16)
    bf16 = msplora.inject(copy.deepcopy(base_bf16), llama_config())
    for kb in bf16.msplora_bank.kinds.values():
        assert kb.A.dtype == kb.B.dtype == torch.float32
    copy_bank(fp32, bf16)
    x = inputs()

    with torch.no_grad():
        ref, out = logits(fp32, x), logits(bf16, x).float()
        effect = (ref - logits(tiny_llama(), x)).abs().max()
    # bf16 keeps 8 significant bits (unit roundoff 2^-9); weights, activations and 4
    # residual layers each round. 4 % of the logits' range is ~20 roundoffs: the bf16 model
    # itself (no adapter) already sits at ~1 %. The adapter's effect is far larger, so an
    # adapter that were dropped or cast to bf16 badly could not pass.
    tol = 0.04 * ref.abs().max()
    assert (out - ref).abs().max() <= tol
    assert effect > 5 * tol

    # trains only the fp32 adapter tensors
    bf16.train()
    logits(bf16, x).float().square().mean().backward()
    trainable = {n for n, p in bf16.named_parameters() if p.requires_grad}
    assert trainable == {f"msplora_bank.kinds.{k}.{t}" for k in ("q_proj", "v_proj") for t in "AB"}
    for n, p in bf16.named_parameters():
        if p.requires_grad:
            assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None, n
    bf16.eval()

    # merge: W + delta summed in fp32 and rounded once into the bf16 weight
    w0 = {n: layer.base_layer.weight.clone() for n, layer in msplora.wrapped_layers(bf16)}
    deltas = {n: layer.delta_weight().detach() for n, layer in msplora.wrapped_layers(bf16)}
    msplora.merge(bf16)
    for n, layer in msplora.wrapped_layers(bf16):
        w = layer.base_layer.weight
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, (w0[n].float() + deltas[n]).to(torch.bfloat16)), n  # one rounding, not two
    with torch.no_grad():
        merged = logits(bf16, x).float()
    assert (merged - ref).abs().max() <= tol
    msplora.unmerge(bf16)
    for n, layer in msplora.wrapped_layers(bf16):
        # (round(W + d) - d) rounded: off from W by at most one bf16 ulp of |W| + |d|
        ulp = 2.0**-7 * (w0[n].float().abs() + deltas[n].abs())
        assert ((layer.base_layer.weight.float() - w0[n].float()).abs() <= ulp).all(), n


# -- dropout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_eval_is_deterministic_and_equals_no_dropout(variant):
    # Injected into a model already in eval mode: the new wrappers must be in eval too.
    cfg = dict(targets=["query", "value"], levels=copy.deepcopy(VARIANTS[variant]))
    dropped = msplora.inject(tiny_bert(), MSPLoRAConfig(**cfg, dropout=0.5))
    plain = msplora.inject(tiny_bert(), MSPLoRAConfig(**cfg, dropout=0.0))
    randomize_adapter(dropped)
    copy_bank(dropped, plain)
    assert not any(m.training for m in dropped.modules())
    x = inputs()
    with torch.no_grad():
        first, second = logits(dropped, x), logits(dropped, x)
        assert torch.equal(first, second)
        assert torch.equal(first, logits(plain, x))  # eval dropout is the identity, bit for bit


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_train_one_mask_for_all_levels(variant):
    p = 0.5
    model = msplora.inject(tiny_llama(), llama_config(variant, dropout=p))
    randomize_adapter(model)
    model.train()
    _, layer = list(msplora.wrapped_layers(model))[-1]
    kb = layer.bank
    x = torch.randn(5, kb.d_in, generator=torch.Generator().manual_seed(4))

    def by_hand(masked_inputs):  # masked_inputs[k]: the dropped-out x seen by level k
        out = layer.base_layer(x)
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)
            c = kb.cells[k][layer.pos]
            out = out + lv.scale * (masked_inputs[k] @ a[c].T) @ b[c].T
        return out

    with torch.no_grad():
        torch.manual_seed(7)
        fused = layer(x)
        torch.manual_seed(7)  # the base linear draws no random numbers, so this is the same mask
        one_mask = F.dropout(x, p, training=True)
        independent = [F.dropout(x, p, training=True) for _ in kb.levels]
        independent[0] = one_mask
        # fp32, same products summed in another order (fused: one matmul over all levels)
        torch.testing.assert_close(fused, by_hand([one_mask] * len(kb.levels)), atol=1e-5, rtol=1e-5)
        no_drop = layer.base_layer(x) + x @ layer.delta_weight().T
        assert (fused - no_drop).abs().max() > 1e-2  # the mask did act
        if len(kb.levels) > 1:  # a mask per level would give another output
            assert (fused - by_hand(independent)).abs().max() > 1e-2
