"""Parameter counts and reports, and the adapter's updates as dense matrices (for analysis)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from msplora.inject.adapted import get_bank, wrapped_layers


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters; each shared tensor counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> int:
    """Number of adapter (A/B) parameters only, without task heads."""
    return sum(p.numel() for p in get_bank(model).parameters())


def parameter_report(model: nn.Module) -> list[dict]:
    """One row per (level, kind): share, rank, cells, shape and parameter count."""
    rows = []
    for kind, kb in get_bank(model).kinds.items():
        for k, lv in enumerate(kb.levels):
            rows.append(
                dict(
                    level=lv.name,
                    share=lv.share,
                    kind=kind,
                    rank=lv.rank,
                    cells=kb.n_cells[k],
                    d_in=kb.d_in,
                    d_out=kb.d_out,
                    params=lv.rank * kb.n_cells[k] * (kb.d_in + kb.d_out),
                )
            )
    return rows


def format_report(model: nn.Module) -> str:
    """The parameter report as a markdown table, with totals per level."""
    rows = parameter_report(model)
    lines = ["| level | share | kind | rank | cells | d_in x d_out | params |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['level']} | {r['share']} | {r['kind']} | {r['rank']} | {r['cells']} | {r['d_in']}x{r['d_out']} | {r['params']:,} |"
        for r in rows
    ]
    per_level: dict[str, int] = defaultdict(int)
    for r in rows:
        per_level[r["level"]] += r["params"]
    lines += [f"| **{lv}** | | all | | | | {n:,} |" for lv, n in per_level.items()]
    lines.append(f"| **adapter total** | | | | | | {sum(per_level.values()):,} |")
    lines.append(f"| **trainable total** | | | | | | {trainable_parameters(model):,} |")
    return "\n".join(lines)


@torch.no_grad()
def level_updates(model: nn.Module) -> dict[tuple[str, str, int], torch.Tensor]:
    """(level name, kind, cell) -> s_k B A, shape (d_out, d_in)."""
    out = {}
    for kind, kb in get_bank(model).kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # (n, r, d_in), (n, d_out, r)
            for c in range(kb.n_cells[k]):
                out[(lv.name, kind, c)] = lv.scale * b[c].float() @ a[c].float()
    return out


@torch.no_grad()
def layer_updates(model: nn.Module) -> dict[tuple[str, int], torch.Tensor]:
    """(kind, layer index) -> the layer's whole delta sum_k s_k B A, shape (d_out, d_in)."""
    out = {}
    for _, layer in wrapped_layers(model):
        d = layer.delta_weight().float()
        out[(layer.kind, layer.layer_id)] = d.T if layer.fan_in_fan_out else d
    return out
