"""References written independently of the bank's own bookkeeping, so a wrong offset, cell map
or dtype in the core cannot agree with itself:

* the layout: per-level tensors made here, loaded through the adapter file, against
  h = W x + sum_k s_k B_{k,c} A_{k,c} x with a cell map written out by hand (level blocks that
  overlapped would overwrite each other on load);
* a bf16 base: the adapter term is computed in fp32 and rounded once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import msplora
from msplora import MSPLoRAConfig
from tests.tiny import N_LAYERS, VARIANTS, tiny_llama

assert N_LAYERS == 4  # the cell maps below are written for 4 layers
# variant -> per level: (rank, alpha, cell of layers 0..3), by hand from docs/design.md:
# uneven group splits put the extra layer in the first groups; group_size=3 -> [3, 1]
CELLS = {
    "paper": [(8, 16, [0, 0, 0, 0]), (4, 16, [0, 0, 1, 2]), (2, 16, [0, 1, 2, 3])],
    "no_mid": [(8, 16, [0, 0, 0, 0]), (2, 16, [0, 1, 2, 3])],
    "no_global": [(4, 16, [0, 0, 1, 1]), (2, 16, [0, 1, 2, 3])],
    "lora": [(8, 16, [0, 1, 2, 3])],
    "four_level": [(8, 8, [0, 0, 0, 0]), (4, 16, [0, 0, 0, 1]), (3, 16, [0, 0, 1, 1]), (1, 4, [0, 1, 2, 3])],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_against_a_hand_written_cell_map(variant, tmp_path):
    cfg = MSPLoRAConfig(targets=["q_proj", "v_proj"], levels=copy.deepcopy(VARIANTS[variant]), dropout=0.0)
    base = tiny_llama()
    model = msplora.inject(copy.deepcopy(base), cfg)
    msplora.save_adapter(model, tmp_path / "zero")  # the file's config and layout; tensors replaced below
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for kind, kb in model.msplora_bank.kinds.items():
        for lv, (rank, _, cells) in zip(kb.levels, CELLS[variant]):
            n = max(cells) + 1
            tensors[f"{lv.name}.{kind}.A"] = torch.randn(n, rank, kb.d_in, generator=g)
            tensors[f"{lv.name}.{kind}.B"] = torch.randn(n, kb.d_out, rank, generator=g)
    save_file(tensors, str(tmp_path / "zero" / "adapter_model.safetensors"))
    loaded = msplora.load_adapter(copy.deepcopy(base), tmp_path / "zero").eval()
    # every tensor is stored once: the bank holds exactly the sum of the levels' blocks
    for kind, kb in loaded.msplora_bank.kinds.items():
        assert kb.A.numel() == sum(tensors[f"{lv.name}.{kind}.A"].numel() for lv in kb.levels)
    x = torch.randn(3, 32, generator=g)
    for name, layer in msplora.wrapped_layers(loaded):
        kind, pos = layer.kind, layer.layer_id
        delta = torch.zeros(layer.bank.d_out, layer.bank.d_in, dtype=torch.float64)
        for lv, (rank, alpha, cells) in zip(layer.bank.levels, CELLS[variant]):
            a = tensors[f"{lv.name}.{kind}.A"][cells[pos]].double()  # (r, d_in)
            b = tensors[f"{lv.name}.{kind}.B"][cells[pos]].double()  # (d_out, r)
            delta += alpha / rank * b @ a
        with torch.no_grad():
            got = (layer(x) - layer.base_layer(x)).double()  # (3, d_out)
        want = x.double() @ delta.T
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, variant)


def test_adapter_term_is_fp32_on_a_bf16_base():
    """With W = 0 the output is the adapter term alone, rounded once to bf16: within half a bf16
    ulp (2^-8 relative) of the exact value. Adapter math in bf16 (A, B or the rank-R hidden
    rounded to 8 bits) is off by several ulps somewhere."""
    base = tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16)
    with torch.no_grad():
        for name, mod in base.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                mod.weight.zero_()
    model = msplora.inject(base, MSPLoRAConfig(targets=["q_proj", "v_proj"], dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for kb in model.msplora_bank.kinds.values():
            assert kb.A.dtype == kb.B.dtype == torch.float32
            kb.A.copy_(torch.randn(kb.A.shape, generator=g))
            kb.B.copy_(torch.randn(kb.B.shape, generator=g) * 0.1)
    x = torch.randn(16, 128, generator=g).to(torch.bfloat16)
    for name, layer in msplora.wrapped_layers(model):
        with torch.no_grad():
            out = layer(x)
            assert out.dtype == torch.bfloat16
            exact = x.double() @ layer.delta_weight().double().T  # (16, d_out)
        # relative to each element, floored at 1e-3 of the largest (fp32's own error near zero)
        rel = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-3 * exact.abs().max())).max()
        assert rel <= 2.0**-8, (name, rel.item())
