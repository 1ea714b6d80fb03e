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

from collections.abc import Mapping, Sequence

SHARES = ("global", "group", "layer")


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


def cell_of_layer(share: str, n_layers: int, groups: int | None = None, group_size: int | None = None) -> list[int]:
    """Cell index of each layer position 0..n_layers-1 for one level."""
    if share == "global":
        return [0] * n_layers
    if share == "layer":
        return list(range(n_layers))
    if share == "group":
        return [g for g, size in enumerate(group_sizes(n_layers, groups, group_size)) for _ in range(size)]
    raise ValueError(f"unknown share scheme {share!r}; use one of {SHARES}")


def n_cells(share: str, n_layers: int, groups: int | None = None, group_size: int | None = None) -> int:
    return max(cell_of_layer(share, n_layers, groups, group_size)) + 1


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
    """``sum_kind sum_k r_k * (d_in + d_out) * n_cells_k`` (DESIGN.md section 1).

    ``levels``: dicts (or dataclasses as dicts) with share, rank, groups, group_size.
    ``shapes``: target kind -> (d_in, d_out).
    """
    total = 0
    for d_in, d_out in shapes.values():
        for lv in levels:
            cells = n_cells(lv["share"], n_layers, lv.get("groups"), lv.get("group_size"))
            total += lv["rank"] * (d_in + d_out) * cells
    return total
