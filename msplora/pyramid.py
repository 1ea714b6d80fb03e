"""The pyramid as pure functions: no torch, no model, testable on their own.

A level splits the L adapted layers into *cells*; all layers of one cell share
that level's (A, B) pair::

    layers      0  1  2  3  4  5  6  7  8  9 10 11
    global     [                0                 ]   1 cell
    mid (G=3)  [    0     ][    1     ][    2     ]   3 cells
    layer      [0][1][2][3][4][5][6][7][8][9][10][11] 12 cells

Uneven splits: ``groups=G`` spreads the remainder over the *first* groups
(12 layers in 5 groups -> sizes 3, 3, 2, 2, 2, like ``numpy.array_split``);
``group_size=S`` makes full groups from the bottom and leaves the remainder as a
smaller *last* group (12 layers, S=5 -> sizes 5, 5, 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# Scale s_k of a level's update s_k B A, by rule (name -> formula). With alpha 16 on ranks
# 8/4/2, ``lora`` gives 2/4/8 (the finest level moves 4x as fast as the coarsest under Adam),
# ``rslora`` 5.7/8/11.3 (2x), ``constant`` 16/16/16 (set alpha to the one scale wanted).
SCALE_RULES = {"lora": "alpha / r", "rslora": "alpha / sqrt(r)", "constant": "alpha"}
# Learning-rate multiplier of a cell serving n layers, on top of its level's lr_scale.
LR_RULES = {"none": "1", "layers": "1 / n", "sqrt_layers": "1 / sqrt(n)"}


def group_sizes(n_layers: int, groups: int | None = None, group_size: int | None = None) -> list[int]:
    """Sizes of consecutive groups covering ``n_layers`` layers (see module docstring)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if (groups is None) == (group_size is None):
        raise ValueError("give exactly one of groups= or group_size=")
    if groups is not None:
        if not 1 <= groups <= n_layers:
            raise ValueError(f"groups={groups} must be between 1 and the layer count {n_layers}")
        base, extra = divmod(n_layers, groups)
        return [base + 1] * extra + [base] * (groups - extra)
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    full, rest = divmod(n_layers, group_size)
    return [group_size] * full + ([rest] if rest else [])


# -- sharing schemes: the one registry every other module consults ---------------------------------
@dataclass(frozen=True)
class ShareScheme:
    """How one level's cells cover the layers (a level's ``share``). A new scheme is one entry
    of :data:`SHARE_SCHEMES`: config validation, default level names, short labels, the bank's
    cells and the parameter formula all read it from there."""

    name: str
    """The ``share`` value in configs."""
    cells: Callable[[int, int | None, int | None], list[int]]
    """(n_layers, groups, group_size) -> the cell index of each layer position."""
    level_name: str
    """A level's default name (its key in reports and adapter files)."""
    tag: str
    """One letter in short labels (``G8 M4x3 L2``); the ablation's result files store them."""
    grouped: bool = False
    """Takes exactly one of ``groups`` / ``group_size`` (and only this scheme may)."""
    only_one: str | None = None
    """Set when a pyramid may hold one level of this scheme at most: the fix shown otherwise."""


def _grouped_cells(n_layers: int, groups: int | None, group_size: int | None) -> list[int]:
    return [g for g, size in enumerate(group_sizes(n_layers, groups, group_size)) for _ in range(size)]


SHARE_SCHEMES: dict[str, ShareScheme] = {
    s.name: s
    for s in (
        ShareScheme(
            "global",
            lambda n, groups, size: [0] * n,
            level_name="global",
            tag="G",
            only_one="a global level covers every layer once; keep one",
        ),
        ShareScheme("group", _grouped_cells, level_name="mid", tag="M", grouped=True),  # M: the paper's "mid"
        ShareScheme("layer", lambda n, groups, size: list(range(n)), level_name="layer", tag="L"),
    )
}


def share_scheme(share: str) -> ShareScheme:
    """The registered scheme called ``share``; ``ValueError`` naming the valid ones otherwise."""
    try:
        return SHARE_SCHEMES[share]
    except (KeyError, TypeError):
        raise ValueError(f"unknown share scheme {share!r}; use one of {tuple(SHARE_SCHEMES)}") from None


def cell_of_layer(share: str, n_layers: int, groups: int | None = None, group_size: int | None = None) -> list[int]:
    """Cell index of each layer position 0..n_layers-1 for one level."""
    return share_scheme(share).cells(n_layers, groups, group_size)


def n_cells(share: str, n_layers: int, groups: int | None = None, group_size: int | None = None) -> int:
    return max(cell_of_layer(share, n_layers, groups, group_size)) + 1


def short_label(levels: Sequence[Mapping], n_layers: int | None = None, ranks: bool = True) -> str:
    """``G8 M4x3 L2``: one token a level, coarse to fine (share letter, then the rank).

    G = global, M = mid (group), L = per layer. A mid level adds its cell count (``x3``) when
    ``n_layers`` is known, else its grouping (``/3g``: 3 groups, ``/s4``: groups of 4 layers).
    ``ranks=False`` gives the shape alone (``G M/3g L``). The ablation's result files store this
    string (field ``levels``); keep it stable.
    """
    out = []
    for lv in levels:
        share = lv.get("share")
        scheme = SHARE_SCHEMES.get(share) if isinstance(share, str) else None
        s = (scheme.tag if scheme else str(share)) + (str(lv.get("rank")) if ranks else "")
        if scheme is not None and scheme.grouped:
            if n_layers:
                s += f"x{n_cells(share, n_layers, lv.get('groups'), lv.get('group_size'))}"
            else:
                s += f"/{lv['groups']}g" if lv.get("groups") else f"/s{lv.get('group_size')}"
        out.append(s)
    return " ".join(out)


def rank_schedule(n_levels: int, r0: int, decay: float = 0.5) -> list[int]:
    """Geometric ranks from coarse to fine: ``r_k = max(1, round(r0 * decay**k))``.

    ``decay=0.5`` halves (8, 4, 2), ``0.25`` quarters (16, 4, 1), ``1.0`` is flat.
    Python's ``round`` rounds halves to even; ranks are floored at 1.
    """
    if n_levels < 1 or r0 < 1:
        raise ValueError(f"need n_levels >= 1 and r0 >= 1, got {n_levels}, {r0}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay={decay} must be in (0, 1] so ranks do not grow toward finer levels")
    return [max(1, round(r0 * decay**k)) for k in range(n_levels)]


def parameter_count(levels: Sequence[Mapping], n_layers: int, shapes: Mapping[str, tuple[int, int]]) -> int:
    """``sum_kind sum_k r_k * (d_in + d_out) * n_cells_k`` (docs/design.md section 1).

    ``levels``: dicts (or dataclasses as dicts) with share, rank, groups, group_size.
    ``shapes``: target kind -> (d_in, d_out).
    """
    total = 0
    for d_in, d_out in shapes.values():
        for lv in levels:
            cells = n_cells(lv["share"], n_layers, lv.get("groups"), lv.get("group_size"))
            total += lv["rank"] * (d_in + d_out) * cells
    return total


def level_scale(rule: str, alpha: float, rank: int) -> float:
    """s_k of one level: ``lora`` alpha / r (Hu et al.; the paper's and the default),
    ``rslora`` alpha / sqrt(r) (Kalajdzievski 2023, rank-stabilised), ``constant`` alpha
    (the same scale for every level whatever its rank, given one alpha)."""
    if rule == "lora":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "constant":
        return float(alpha)
    raise ValueError(f"unknown scale rule {rule!r}; use one of {list(SCALE_RULES)}")


def alpha_for_scale(rule: str, scale: float, rank: int) -> float:
    """The alpha that gives a level of this rank the scale ``scale`` under ``rule`` (the inverse
    of :func:`level_scale`): a search that samples one scale for the coarsest level, rather
    than alpha, compares the rules at one overall magnitude (alpha 16 means s = 2, 5.7 or 16)."""
    if rule == "lora":
        return scale * rank
    if rule == "rslora":
        return scale * math.sqrt(rank)
    if rule == "constant":
        return float(scale)
    raise ValueError(f"unknown scale rule {rule!r}; use one of {list(SCALE_RULES)}")


def cell_lr_multipliers(
    share: str,
    n_layers: int,
    groups: int | None = None,
    group_size: int | None = None,
    lr_scale: float = 1.0,
    rule: str = "none",
) -> list[float]:
    """Learning-rate multiplier of each cell of one level: ``lr_scale * f(n_c)``, n_c = layers
    the cell serves, f = 1 (``none``), 1 / n_c (``layers``) or 1 / sqrt(n_c) (``sqrt_layers``).

    Why ``layers``: a shared cell's step moves all n_c layers it serves at once, so dividing
    its LR by n_c makes one step change the model about as much as a per-layer cell's step.
    """
    sizes = [0] * n_cells(share, n_layers, groups, group_size)
    for c in cell_of_layer(share, n_layers, groups, group_size):
        sizes[c] += 1
    if rule == "none":
        return [lr_scale] * len(sizes)
    if rule == "layers":
        return [lr_scale / n for n in sizes]
    if rule == "sqrt_layers":
        return [lr_scale / math.sqrt(n) for n in sizes]
    raise ValueError(f"unknown lr rule {rule!r}; use one of {list(LR_RULES)}")


def budget_rank(
    budget: Sequence[Mapping], levels: Sequence[Mapping], layout: Mapping[str, tuple[int, int, int]]
) -> int:
    """The one rank r that, given to every level of ``levels``, brings their adapter count
    nearest to the count of the pyramid ``budget`` on the same targets.

    ``layout``: target kind -> (adapted layers, d_in, d_out), e.g. from
    :func:`msplora.inject.target_layout`. Rounding: to the nearest integer, a tie going to the
    smaller rank (the baseline never gets the extra half rank), and at least 1::

        r = max(1, ceil(P / U - 1/2)),  P = budget's count,  U = count of ``levels`` at rank 1

    MiniLM (6 layers, q/v 384 x 384), budget 8/4/2 over 3 groups: P/U = 32/6 -> r = 5;
    RoBERTa-base (12 layers, 768): 44/12 -> r = 4.
    """
    per_rank = sum(
        parameter_count([{**lv, "rank": 1} for lv in levels], n, {kind: (d_in, d_out)})
        for kind, (n, d_in, d_out) in layout.items()
    )
    total = sum(parameter_count(budget, n, {kind: (d_in, d_out)}) for kind, (n, d_in, d_out) in layout.items())
    return max(1, (2 * total + per_rank - 1) // (2 * per_rank))  # integer form of ceil(P/U - 1/2)


def lora_budget_rank(budget: Sequence[Mapping], layout: Mapping[str, tuple[int, int, int]]) -> int:
    """The plain-LoRA rank (one per-layer level) with the adapter count nearest ``budget``'s
    on ``layout``: the equal-budget baseline. Rounding as in :func:`budget_rank`."""
    return budget_rank(budget, [{"share": "layer"}], layout)
