"""The bank that owns every A/B once, and the wrapper around each frozen linear map.

Storage, per target kind (e.g. ``query``), all levels and cells stacked in two tensors::

    A  (R_tot, d_in)    rows:    [global c0 | mid c0 | mid c1 | mid c2 | layer c0 | ... ]
    B  (d_out, R_tot)   columns: same order as A's rows
    R_tot = sum_k r_k * n_cells_k

A wrapped layer at position l holds the row indices of its cells, one block per level,
``rows = [global c0 rows, mid cell_mid(l) rows, layer l rows]`` (sum_k r_k of them), and
the per-row scales ``alpha_k / r_k``. Its forward is then one gather + one down and one
up matmul, whatever the number of levels (DESIGN.md section 4)::

    a = A[rows]                      # (R, d_in)
    b = B[:, rows]                   # (d_out, R)
    y = W x + b @ (scale * (a @ drop(x)))

Dropout: one mask on x, shared by every level (all levels see the same drop(x)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msplora.config import ConfigError, Level
from msplora.pyramid import cell_of_layer, n_cells

PREFIX = "msplora_bank"  # every adapter parameter's name starts with this (STYLE principle 7)


class KindBank(nn.Module):
    """A and B of every level and cell for one target kind (see module docstring)."""

    def __init__(
        self,
        levels: Sequence[Level],
        layer_ids: Sequence[int],
        d_in: int,
        d_out: int,
        init: str = "lora",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.levels = list(levels)
        self.layer_ids = list(layer_ids)  # model layer index of each position
        self.d_in, self.d_out = d_in, d_out
        n = len(self.layer_ids)
        self.cells = [cell_of_layer(lv.share, n, lv.groups, lv.group_size) for lv in self.levels]
        self.n_cells = [n_cells(lv.share, n, lv.groups, lv.group_size) for lv in self.levels]
        self.offsets = []  # first row of each level's block
        total = 0
        for lv, nc in zip(self.levels, self.n_cells):
            self.offsets.append(total)
            total += lv.rank * nc
        self.A = nn.Parameter(torch.empty(total, d_in, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(d_out, total, device=device, dtype=dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "lora") -> None:
        if self.A.is_meta:
            return
        for k, lv in enumerate(self.levels):
            block = self.A[self.offsets[k] : self.offsets[k] + lv.rank * self.n_cells[k]]
            if init == "lora":
                # As nn.Linear(d_in, r): bound 1/sqrt(d_in) for every cell.
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            else:
                nn.init.normal_(block, std=1 / lv.rank)
        self.B.zero_()

    def rows(self, pos: int) -> list[int]:
        """Row indices (into A, columns of B) used by the layer at position ``pos``."""
        out = []
        for k, lv in enumerate(self.levels):
            start = self.offsets[k] + self.cells[k][pos] * lv.rank
            out.extend(range(start, start + lv.rank))
        return out

    def scales(self) -> list[float]:
        return [lv.scale for lv in self.levels for _ in range(lv.rank)]

    def level_block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Level k's factors as views: A (n_cells, r, d_in), B (n_cells, d_out, r)."""
        r, nc, off = self.levels[k].rank, self.n_cells[k], self.offsets[k]
        a = self.A[off : off + r * nc].view(nc, r, self.d_in)
        b = self.B[:, off : off + r * nc].reshape(self.d_out, nc, r).permute(1, 0, 2)
        return a, b


class MSPLoRABank(nn.Module):
    """Owner of all adapter parameters of a model: one :class:`KindBank` per target kind."""

    def __init__(self, config, kinds: dict[str, KindBank]) -> None:
        super().__init__()
        self.config = config
        self.kinds = nn.ModuleDict(kinds)


class MSPLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` or GPT-2 ``Conv1D``; adds the pyramid's delta.

    The wrapper knows its coordinates (kind, layer position) and reads its rows from
    the shared :class:`KindBank`, which it references without owning (so the shared
    tensors appear once in ``parameters()`` and ``state_dict()``).
    """

    def __init__(
        self, base_layer: nn.Module, bank: KindBank, kind: str, pos: int, dropout: float, fan_in_fan_out: bool
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["_bank"] = bank  # a reference, not a submodule
        self.kind, self.pos, self.layer_id = kind, pos, bank.layer_ids[pos]
        self.fan_in_fan_out = fan_in_fan_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = bank.A.device
        self.register_buffer("rows", torch.tensor(bank.rows(pos), device=dev), persistent=False)
        self.register_buffer("scale", torch.tensor(bank.scales(), device=dev, dtype=bank.A.dtype), persistent=False)
        self.merged = False
        self.disabled = False

    @property
    def bank(self) -> KindBank:
        return self._bank

    @property
    def weight(self) -> torch.Tensor:  # models that peek at .weight (dtype checks) still work
        return self.base_layer.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        bank = self._bank
        a = bank.A.index_select(0, self.rows)  # (R, d_in)
        b = bank.B.index_select(1, self.rows)  # (d_out, R)
        h = F.linear(self.dropout(x.to(a.dtype)), a) * self.scale  # (..., R)
        return out + F.linear(h, b).to(out.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """sum_k s_k B_k A_k in the base weight's layout: (d_out, d_in), or transposed for Conv1D."""
        bank = self._bank
        a = bank.A.index_select(0, self.rows)
        b = bank.B.index_select(1, self.rows)
        delta = (b * self.scale) @ a
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> torch.Tensor:
        """W + sign * delta, summed in the wider of W's and the bank's dtype and rounded once
        to W's dtype (a bf16 base with an fp32 bank: one rounding, not two). W is untouched."""
        w = self.base_layer.weight
        acc = torch.promote_types(w.dtype, self._bank.A.dtype)
        return (w.to(acc) + sign * self.delta_weight().to(acc)).to(w.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        if self.merged:
            return
        new = self.merged_weight(+1)
        if safe and not torch.isfinite(new).all():
            raise ConfigError(
                f"merge: the delta of {self.kind} at layer {self.layer_id} gives non-finite weights; not merged. "
                "Fix: look for inf/NaN in the adapter (a diverged run?) before merging"
            )
        self.base_layer.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.copy_(self.merged_weight(-1))
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer_id}, rank={self.rows.numel()}"
