"""PNG figures: a level's spectrum over epochs, a layer-by-layer KL matrix (matplotlib, no pyplot)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from msplora.analysis.numerics import _level_spectra


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name)


def _ticks(n: int) -> range:
    return range(0, n, max(1, n // 16))  # at most ~16 labels: readable for 80 layers or rank 64 too


def _figure(n_panels: int, width: float = 4.5, height: float = 3.8):
    # Figure + Agg canvas directly, not pyplot: no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def plot_level_spectra(doc: dict, level: str, path: Path) -> Path:
    """Heatmap of singular-value magnitude, rows = epochs, columns = singular index, one panel
    per kind; a level's cells are averaged (index by index, values sorted descending)."""
    records = doc["records"]
    kinds = sorted(_level_spectra(records[-1])[level])
    fig, axes = _figure(len(kinds))
    for ax, kind in zip(axes, kinds):
        rows = []
        for rec in records:
            cells = _level_spectra(rec)[level][kind]
            width = max(len(sv) for sv in cells.values())
            rows.append(np.mean([np.pad(sv, (0, width - len(sv))) for sv in cells.values()], axis=0))
        img = ax.imshow(np.stack(rows), aspect="auto", cmap="viridis", interpolation="nearest")  # (epochs, r)
        ax.set_title(f"{level} / {kind} ({len(cells)} cell{'s' * (len(cells) > 1)}, mean)")
        ax.set_xlabel("singular value index")
        # rows are labelled by step when several records share an epoch (every_n_steps)
        by_step = len({r["epoch"] for r in records}) < len(records) and all("step" in r for r in records)
        ax.set_ylabel("step" if by_step else "epoch")
        xt, yt = _ticks(len(rows[0])), _ticks(len(records))
        ax.set_xticks(xt, [str(i + 1) for i in xt])
        ax.set_yticks(yt, [str(records[i]["step" if by_step else "epoch"]) for i in yt])
        fig.colorbar(img, ax=ax, label="singular value")
    fig.suptitle(f"Spectrum of level '{level}' updates s_k B A over training")
    fig.savefig(path, dpi=110)
    return path


def plot_matrix(m: np.ndarray, layer_ids: list[int], title: str, path: Path, diverging: bool = False) -> Path:
    """Layers x layers heatmap; ``diverging`` centres a red/blue colormap at 0."""
    fig, (ax,) = _figure(1, 5.2, 4.4)
    if diverging:
        v = float(np.abs(m).max()) or 1e-12
        img = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        label = "KL difference (MSPLoRA - LoRA)"
    else:
        img = ax.imshow(m, cmap="magma", interpolation="nearest")
        label = "KL(p_i || p_j)"
    ticks = _ticks(len(layer_ids))
    ax.set_xticks(ticks, [str(layer_ids[t]) for t in ticks])
    ax.set_yticks(ticks, [str(layer_ids[t]) for t in ticks])
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title)
    fig.colorbar(img, ax=ax, label=label)
    fig.savefig(path, dpi=110)
    return path
