"""The bank that owns every A/B once, and the wrapper around each frozen linear map.

Storage, per target kind (e.g. ``query``), all levels and cells stacked in two tensors::

    A  (R_tot, d_in)    rows:    [global c0 | mid c0 | mid c1 | mid c2 | layer c0 | ... ]
    B  (d_out, R_tot)   columns: same order as A's rows
    R_tot = sum_k r_k * n_cells_k

A wrapped layer at position l holds the row indices of its cells, one block per level,
``rows = [global c0 rows, mid cell_mid(l) rows, layer l rows]`` (sum_k r_k of them). The
per-row scales s_k (``scale_rule``: alpha_k / r_k by default) are the same for every
position, so the bank keeps them once. Its forward is then one gather + one down and one
up matmul, whatever the number of levels (docs/design.md section 4)::

    a, b, scale = bank.gather(rows)  # (R, d_in), (d_out, R), (R,)
    y = W x + b @ (scale * (a @ drop(x)))

``KindBank.gather`` is the one place rows and scales meet: forward, ``delta_weight`` (merge),
peft export and analysis all call it.

Dropout: one mask on x, shared by every level (all levels see the same drop(x)).

Per-level learning rates: a kind's levels share one A and one B tensor (so the forward
stays fused), so an optimizer's parameter groups cannot give them different LRs. Instead
:func:`scale_level_steps` multiplies each row's optimizer step by its multiplier after the
step. For AdamW the step is linear in lr,

    theta_new - theta = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * theta)

(Adam's moments do not depend on lr), so ``theta + c * (theta_new - theta)`` is exactly the
step with lr * c, weight decay and eps included (to float rounding); the same holds for
SGD, Adam and RMSprop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msplora.config import ConfigError, Level
from msplora.pyramid import cell_lr_multipliers, cell_of_layer, n_cells
from msplora.quant import dequantize, is_quantized, merge_weight, restore_weight, snapshot
from msplora.sharding import local_part, local_slice

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
        # s_k of each of a layer's R = sum_k r_k rows; not saved (it follows from the config)
        self.register_buffer(
            "row_scale", torch.tensor(self.scales(), device=device, dtype=dtype), persistent=False
        )  # (R,)
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
        """s_k of each of a layer's rows, in ``rows`` order (the same for every position)."""
        return [lv.scale for lv in self.levels for _ in range(lv.rank)]

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors of one layer, or of a batch of layers: the delta is ``(b * scale) @ a``.

        rows (R,)   -> a (R, d_in),    b (d_out, R),    scale (R,)
        rows (n, R) -> a (n, R, d_in), b (n, d_out, R), scale (R,)
        """
        if rows.dim() == 1:
            return self.A.index_select(0, rows), self.B.index_select(1, rows), self.row_scale
        a = self.A[rows]  # (n, R, d_in)
        b = self.B[:, rows].permute(1, 0, 2)  # (d_out, n, R) -> (n, d_out, R)
        return a, b, self.row_scale

    def lr_multipliers(self, lr_rule: str = "none") -> torch.Tensor:
        """Learning-rate multiplier of each row of A (= column of B), shape (R_tot,): the
        level's ``lr_scale`` times the ``lr_rule`` factor of the row's cell (see
        :func:`msplora.pyramid.cell_lr_multipliers`)."""
        return torch.tensor(self.row_lr_factors(lr_rule), device=self.A.device, dtype=self.A.dtype)

    def row_lr_factors(self, lr_rule: str = "none") -> list[float]:
        """:meth:`lr_multipliers` as plain numbers (from the config alone: also on a meta-device bank)."""
        n = len(self.layer_ids)
        out = []
        for lv in self.levels:
            for m in cell_lr_multipliers(lv.share, n, lv.groups, lv.group_size, lv.lr_scale, lr_rule):
                out.extend([m] * lv.rank)
        return out

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

    def lr_multipliers(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, per-element step multiplier broadcastable to it) for every A and B
        whose rows do not all train at the adapter's LR; empty under the default config."""
        out = []
        for kb in self.kinds.values():
            if any(f != 1 for f in kb.row_lr_factors(self.config.lr_rule)):
                m = kb.lr_multipliers(self.config.lr_rule)  # (R_tot,)
                out += [(kb.A, m[:, None]), (kb.B, m[None, :])]  # rows of A, columns of B
        return out


def scale_level_steps(optimizer: torch.optim.Optimizer, bank: MSPLoRABank) -> list:
    """Make ``optimizer``'s steps move each adapter row by its level's LR multiplier times the
    step it would take (module docstring: exact for AdamW, Adam, SGD, RMSprop; not for
    optimizers whose step is not proportional to lr, such as Adafactor's relative steps).

    Uses the optimizer's public step pre/post hooks. Returns their handles (``.remove()``
    undoes it); none are registered, and nothing changes, when every multiplier is 1.
    """
    pairs = bank.lr_multipliers()
    if not pairs:
        return []
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [tuple(p.shape) for p, _ in pairs if id(p) not in params]
    if missing:
        raise ValueError(
            f"scale_level_steps: adapter tensors of shape {missing} are not in this optimizer. "
            "Fix: build the optimizer over the model's trainable parameters first"
        )
    # Under FSDP the bank's tensors are sharded (DTensors): each rank rescales its own shard with
    # the matching part of the multiplier, so no step gathers anything.
    local = [(local_part(p), local_slice(m.to(dtype=p.dtype, device=p.device), p)) for p, m in pairs]
    before: list[torch.Tensor] = []

    def snapshot(opt, args, kwargs) -> None:
        before[:] = [p.detach().clone() for p, _ in local]

    @torch.no_grad()
    def rescale(opt, args, kwargs) -> None:
        for (p, m), old in zip(local, before):
            p.copy_(old.addcmul_(p - old, m))  # theta + c * (theta_new - theta)
        before.clear()

    return [optimizer.register_step_pre_hook(snapshot), optimizer.register_step_post_hook(rescale)]


class MSPLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``, GPT-2 ``Conv1D`` or bitsandbytes 4/8-bit linear
    (:mod:`msplora.quant`); adds the pyramid's delta, computed in the bank's dtype.

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
        self.register_buffer("rows", torch.tensor(bank.rows(pos), device=bank.A.device), persistent=False)
        self.merged = False
        self.disabled = False
        self.quantized = is_quantized(base_layer)  # merge re-quantises (msplora.quant)
        self.merge_error: float | None = None  # max abs error the last merge's re-quantisation added

    @property
    def bank(self) -> KindBank:
        return self._bank

    @property
    def weight(self) -> torch.Tensor:  # models that peek at .weight (dtype checks) still work
        return self.base_layer.weight

    @property
    def scale(self) -> torch.Tensor:
        """s_k of each of this layer's rows, (R,): the bank's, shared by every position."""
        return self._bank.row_scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        a, b, scale = self._bank.gather(self.rows)  # (R, d_in), (d_out, R), (R,)
        h = F.linear(self.dropout(x.to(a.dtype)), a) * scale  # (..., R)
        return out + F.linear(h, b).to(out.dtype)  # (..., d_out)

    def delta_weight(self) -> torch.Tensor:
        """sum_k s_k B_k A_k in the base weight's layout: (d_out, d_in), or transposed for Conv1D."""
        a, b, scale = self._bank.gather(self.rows)  # (R, d_in), (d_out, R), (R,)
        delta = (b * scale) @ a
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> torch.Tensor:
        """W + sign * delta, summed in the wider of W's and the bank's dtype and rounded once
        to W's dtype (a bf16 base with an fp32 bank: one rounding, not two). W is untouched.
        A quantized W: deq(W) + sign * delta in fp32 (``merge`` quantises it)."""
        if self.quantized:
            return dequantize(self.base_layer) + sign * self.delta_weight().float()
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
        if self.quantized:  # a new quantized weight; the old one is kept for unmerge
            self.__dict__["_unmerged_weight"], self.merge_error = merge_weight(self.base_layer, new)
        else:
            self.base_layer.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.quantized:  # the pre-merge quantized weight, bit for bit (no second rounding)
            restore_weight(self.base_layer, self.__dict__.pop("_unmerged_weight"))
        else:
            self.base_layer.weight.copy_(self.merged_weight(-1))
        self.merged = False

    def merged_snapshot(self):
        """What :meth:`restore_merged` needs to put this merged layer back bit for bit after an
        unmerge (``disable_adapters``): a copy of W, or a quantized W's weight object."""
        if self.quantized:
            return snapshot(self.base_layer), self.__dict__["_unmerged_weight"]
        return self.base_layer.weight.detach().clone()

    @torch.no_grad()
    def restore_merged(self, snap) -> None:
        if self.quantized:
            merged, self.__dict__["_unmerged_weight"] = snap
            restore_weight(self.base_layer, merged)
        else:
            self.base_layer.weight.copy_(snap)
        self.merged = True

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer_id}, rank={self.rows.numel()}"
