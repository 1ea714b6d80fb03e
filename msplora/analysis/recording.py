"""Singular values of the adapter's updates, per level cell and per layer, without any
d_out x d_in SVD (see the package docstring for the QR trick)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msplora.inject import get_bank

SPECTRA_FILE = "spectra.json"


@torch.no_grad()
def low_rank_svdvals(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` for b (..., d_out, r), a (..., r, d_in), descending.

    Via QR of b and a^T (module docstring); min(r, d_out, d_in) values per matrix.
    """
    b, a = b.double(), a.double()  # fp64: the r x r product is tiny, precision is free
    _, rb = torch.linalg.qr(b)  # (..., min(d_out, r), r)
    _, ra = torch.linalg.qr(a.transpose(-1, -2))  # (..., min(d_in, r), r)
    return torch.linalg.svdvals(rb @ ra.transpose(-1, -2))  # (..., min(r, d_out, d_in))


def _as_list(sv: torch.Tensor) -> list[float]:
    # 7 significant digits: float32 precision, and keeps spectra.json small.
    return [float(f"{v:.7g}") for v in sv.tolist()]


def level_info(model: nn.Module) -> list[dict[str, Any]]:
    """The header of spectra.json: name, share and rank of every level, coarse to fine."""
    return [dict(name=lv.name, share=lv.share, rank=lv.rank) for lv in get_bank(model).config.levels]


@torch.no_grad()
def record_spectra(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """One record (without its epoch) of the singular values of a model's adapter, descending.

    Returns:
        ``{"level": {"<level>/<kind>/<cell>": sv of s_k B_k A_k (r_k values)},
        "layer": {"<kind>/<layer_id>": sv of the whole delta sum_k s_k B_k A_k (sum_k r_k values)}}``
    """
    level: dict[str, list[float]] = {}
    layer: dict[str, list[float]] = {}
    for kind, kb in get_bank(model).kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # (n_cells, r, d_in), (n_cells, d_out, r)
            sv = low_rank_svdvals(b * lv.scale, a)  # (n_cells, r)
            for c in range(kb.n_cells[k]):
                level[f"{lv.name}/{kind}/{c}"] = _as_list(sv[c])
        # Whole delta of layer at position l: B[:, rows_l] diag(scales) A[rows_l], batched over l.
        rows = torch.tensor([kb.rows(pos) for pos in range(len(kb.layer_ids))], device=kb.A.device)  # (n, R)
        a, b, scale = kb.gather(rows)  # (n, R, d_in), (n, d_out, R), (R,)
        sv = low_rank_svdvals(b * scale, a)  # (n, R)
        for pos, layer_id in enumerate(kb.layer_ids):
            layer[f"{kind}/{layer_id}"] = _as_list(sv[pos])
    return {"level": level, "layer": layer}
