"""The benchmark times equal computations: its "separate branches" variant computes what the fused
forward computes (same outputs, same gradients), so `separate/fused` compares like with like."""

from __future__ import annotations

import copy

import pytest
import torch

import msplora
from msplora.bench import SeparateBranches, separate_branches
from tests.tiny import N_LAYERS, VARIANTS, inputs, randomize_adapter, tiny_bert


def _pair(levels, dropout: float):
    """(fused, separate): one injected tiny BERT with a non-zero adapter, and a deep copy switched
    to separate branches the way the bench builds it."""
    fused = msplora.inject(
        tiny_bert(), msplora.MSPLoRAConfig(targets=["query", "value"], levels=levels, dropout=dropout)
    )
    randomize_adapter(fused)  # B = 0 would make every adapter term and A's gradient zero
    fused.train()  # the bench times training steps: dropout on
    separate = separate_branches(copy.deepcopy(fused))
    return fused, separate


def _run(model, x: dict, seed: int):
    torch.manual_seed(seed)  # the same dropout masks, if both draw them in the same order
    out = model.bert(**x).last_hidden_state  # (batch, length, 32): what the bench's step uses
    # A fixed random readout, not the bench's mean(out^2): after BERT's final LayerNorm that is
    # ~1 whatever the input, so its gradients are ~1e-9 noise and would compare nothing.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


# fp32 tolerance, relative to the tensor's largest entry: the fused forward sums every level's
# rank-r terms in one matmul over R = sum r_k rows, the separate one adds one matmul per level:
# the same products summed in another order, so the error scales with the size of the summed
# terms (the tensor's scale), not with each entry. Measured here (d = 32, R <= 16, 4 layers, all
# variants, with and without dropout): <= 1e-6 of the largest entry, outputs and gradients alike.
# 1e-5 leaves 10x margin; the adapter's share of the outputs is ~1 of ~3 (randomised B), so a
# dropped scale (alpha / r = 2 .. 16) or a level read from the wrong cell is 1e4x above it.
REL = 1e-5


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= REL * scale, f"{what}: max |diff| {err:.3g} > {REL} x max |value| {scale:.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_separate_branches_equal_the_fused_forward_and_gradients(variant):
    # dropout 0.05 as in the bench: both must draw one mask per layer, in the same order
    fused, separate = _pair(VARIANTS[variant], 0.05)
    layers = [layer for _, layer in msplora.wrapped_layers(separate)]
    # it really is the other code path, on every wrapped layer (query and value of each layer)
    assert len(layers) == 2 * N_LAYERS and all(type(layer) is SeparateBranches for layer in layers)
    assert not any(isinstance(layer, SeparateBranches) for _, layer in msplora.wrapped_layers(fused))

    x = inputs(batch=3, length=9)
    out_f, grads_f = _run(fused, x, seed=7)
    out_s, grads_s = _run(separate, x, seed=7)
    assert_close_rel(out_s, out_f, "last hidden state")
    assert grads_s.keys() == grads_f.keys()
    # only the adapter trains (the bench has no head): A and B of both kinds
    assert sorted(k.rsplit(".", 2)[-2:][0] + "." + k[-1] for k in grads_f) == [
        "query.A",
        "query.B",
        "value.A",
        "value.B",
    ]
    for name in grads_f:
        assert grads_f[name].abs().sum() > 0, name  # a zero gradient would compare equal to anything
        assert_close_rel(grads_s[name], grads_f[name], f"gradient of {name}")


def test_adapter_changes_the_output_so_the_comparison_has_teeth():
    """The adapter's share of the logits is far above REL: equal outputs mean equal adapter terms."""
    fused, _ = _pair(VARIANTS["paper"], 0.0)
    x = inputs(batch=3, length=9)
    with torch.no_grad():
        with msplora.disable_adapters(fused):
            base = fused.bert(**x).last_hidden_state
        adapted = fused.bert(**x).last_hidden_state
    assert (adapted - base).abs().max() > 1e3 * REL * adapted.abs().max()


def test_separate_branches_follow_merge_and_disable():
    """Merged (or disabled), the separate variant adds nothing on top of the base layer, as fused does."""
    fused, separate = _pair(VARIANTS["paper"], 0.0)
    fused.eval()
    separate.eval()
    x = inputs(batch=2, length=5)
    with torch.no_grad():
        ref = fused(**x).logits
        msplora.merge(separate)
        assert_close_rel(separate(**x).logits, ref, "merged logits")
        msplora.unmerge(separate)
        with msplora.disable_adapters(separate), msplora.disable_adapters(fused):
            assert_close_rel(separate(**x).logits, fused(**x).logits, "disabled logits")
