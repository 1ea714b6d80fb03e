"""Singular-value spectra of the pyramid's updates, their KL divergence between layers, plots.

The paper's Figures 3 and 4 as a tool every run can use::

    training ──SpectrumRecorder (each epoch end, rank 0)──> <log_dir>/spectra.json
                 level:  sv(s_k B_k A_k)       per level / kind / cell  (top r_k values)
                 layer:  sv(sum_k s_k B_k A_k) per kind / layer         (top sum_k r_k values)

    spectra.json ──analyze(run, against=lora_run)──> <run>/analysis/
                 spectrum_<level>.png   singular value vs epoch, one panel per kind
                 kl_<kind>.png          KL(p_i || p_j) between layers i, j (last epoch)
                 kl_diff_<kind>.png     MSPLoRA minus LoRA KL (with --against)
                 summary.md             effective ranks, mean adjacent-layer KL, vs LoRA

A spectrum s becomes a distribution p = s / sum(s). Layers whose updates point their
energy the same way have close p, so a large KL(p_i || p_j) means layer-specific updates.
The paper's Figure 4 asks whether the pyramid's layers differ more than LoRA's (--against).

Singular values are computed cheaply: with B = Q_b R_b and A^T = Q_a R_a (reduced QR),
s B A = Q_b (s R_b R_a^T) Q_a^T, and Q_b, Q_a have orthonormal columns, so the singular
values of s B A are those of the small r x r matrix s R_b R_a^T. No d_out x d_in SVD.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from torch import nn

from msplora.errors import ArgumentParser
from msplora.inject import get_bank
from msplora.io import read_json, write_json_atomic
from msplora.layers import PREFIX
from msplora.sharding import unsharded

SPECTRA_FILE = "spectra.json"
EPS = 1e-6  # probability mass added to every entry before KL (see `normalize`)


# -- recording ------------------------------------------------------------------------------
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


def find_adapted_model(module: nn.Module) -> nn.Module:
    """``module.model`` if it holds the adapter, else the first submodule that does."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, PREFIX):
        return inner
    for m in module.modules():
        if hasattr(m, PREFIX):
            return m
    raise RuntimeError(
        f"SpectrumRecorder: no submodule of {type(module).__name__} holds an MSPLoRA adapter ({PREFIX}). "
        "Fix: inject the adapter before fit (msplora.inject), or add the callback to MSPLoRA runs only"
    )


class SpectrumRecorder(Callback):
    """Record adapter spectra at each training epoch end into ``<log_dir>/spectra.json``.

    Args:
        filename: file name inside the trainer's log dir (``default_root_dir`` without a logger).
        record_init: also record once at fit start as epoch -1. Off by default: at LoRA
            init B = 0, so every singular value is 0.
        every_n_steps: also record every N optimizer steps (0 = epoch ends only), for
            short runs whose whole training is one epoch. Each record carries its ``step``.
    """

    def __init__(self, filename: str = SPECTRA_FILE, record_init: bool = False, every_n_steps: int = 0) -> None:
        self.filename = filename
        self.record_init = record_init
        self.every_n_steps = every_n_steps
        self.records: list[dict] = []
        self.path: Path | None = None

    @property
    def state_key(self) -> str:  # two recorders (different files) may share one Trainer
        return self._generate_state_key(filename=self.filename)

    def on_fit_start(self, trainer, pl_module) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must ask, or DDP hangs.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.path = Path(log_dir) / self.filename
        self._model = find_adapted_model(pl_module)
        if self.record_init:
            self._record(trainer, -1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(trainer, trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self._record(trainer, trainer.current_epoch)

    def _record(self, trainer, epoch: int) -> None:
        with unsharded(self._model):  # FSDP: the whole bank, gathered on every rank (a collective)
            if not trainer.is_global_zero:  # DDP replicas hold the same adapter
                return
            spectra = record_spectra(self._model)
        step = trainer.global_step
        self.records = [r for r in self.records if r.get("step") != step]  # a resumed step replaces
        self.records.append({"epoch": epoch, "step": step, **spectra})
        write_json_atomic(self.path, indent=None, obj={"levels": level_info(self._model), "records": self.records})

    # Records travel in checkpoints, so a resumed run keeps the earlier epochs in its file.
    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict.get("records", []))


# -- analysis (pure) ------------------------------------------------------------------------
def normalize(s, length: int | None = None, eps: float = EPS) -> np.ndarray:
    """Spectrum -> distribution: p = s / sum(s), zero-padded to ``length``, then every entry
    gets ``eps`` added and p is renormalised, so KL stays finite for zero or shorter spectra.
    An all-zero spectrum (untrained adapter) becomes uniform."""
    s = np.asarray(s, dtype=np.float64)
    length = len(s) if length is None else length
    total = s.sum()
    p = s / total if total > 0 else np.full(len(s), 1.0 / max(len(s), 1))
    p = np.pad(p, (0, length - len(p))) + eps  # (length,)
    return p / p.sum()


def kl(p, q) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i) of two distributions of equal length."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(p * np.log(p / q)))


def kl_matrix(spectra: list, eps: float = EPS) -> np.ndarray:
    """(n, n) matrix M[i, j] = KL(p_i || p_j) of spectra normalised to a common length."""
    length = max(len(s) for s in spectra)
    p = np.stack([normalize(s, length, eps) for s in spectra])  # (n, L)
    logp = np.log(p)
    # sum_k p_ik (log p_ik - log p_jk), for all i, j at once
    return (p * logp).sum(1)[:, None] - p @ logp.T  # (n, n)


def effective_rank(s) -> float:
    """Roy & Vetterli (2007): exp of the entropy of p = s / sum(s); 0 for an all-zero spectrum."""
    s = np.asarray(s, dtype=np.float64)
    if s.sum() <= 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def mean_adjacent_kl(m: np.ndarray) -> float:
    """Mean over neighbour layers (i, i+1) of the symmetrised KL (M[i,i+1] + M[i+1,i]) / 2."""
    m = np.asarray(m)
    if len(m) < 2:
        return 0.0
    return float(np.mean((np.diag(m, 1) + np.diag(m, -1)) / 2))


def kl_difference(msplora_kl: np.ndarray, lora_kl: np.ndarray) -> np.ndarray:
    """MSPLoRA minus LoRA KL matrix: positive where MSPLoRA separates the layers more."""
    msplora_kl, lora_kl = np.asarray(msplora_kl), np.asarray(lora_kl)
    if msplora_kl.shape != lora_kl.shape:
        raise ValueError(
            f"KL matrices differ in shape {msplora_kl.shape} vs {lora_kl.shape}; compare runs of one model"
        )
    return msplora_kl - lora_kl


def layer_kl(record: dict) -> dict[str, tuple[list[int], np.ndarray]]:
    """kind -> (layer ids ascending, KL matrix of their whole-update spectra) for one record."""
    by_kind: dict[str, dict[int, list[float]]] = {}
    for key, sv in record["layer"].items():
        kind, layer_id = key.rsplit("/", 1)
        by_kind.setdefault(kind, {})[int(layer_id)] = sv
    out = {}
    for kind, spectra in by_kind.items():
        ids = sorted(spectra)
        out[kind] = (ids, kl_matrix([spectra[i] for i in ids]))
    return out


def _level_spectra(record: dict) -> dict[str, dict[str, dict[int, list[float]]]]:
    """level -> kind -> cell -> singular values."""
    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    for key, sv in record["level"].items():
        level, kind, cell = key.rsplit("/", 2)  # kinds never hold '/', level names might
        out.setdefault(level, {}).setdefault(kind, {})[int(cell)] = sv
    return out


def effective_ranks(record: dict) -> dict[str, dict[str, dict[int, float]]]:
    """level -> kind -> cell -> effective rank, for one record."""
    return {
        level: {kind: {c: effective_rank(sv) for c, sv in sorted(cells.items())} for kind, cells in kinds.items()}
        for level, kinds in _level_spectra(record).items()
    }


# -- loading --------------------------------------------------------------------------------
def find_spectra(run: str | Path) -> Path:
    """``run`` itself if it is a file, else the newest spectra.json anywhere under it."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise FileNotFoundError(
            f"{run}: no such run directory or file. Fix: pass a run directory (e.g. lightning_logs/version_0) "
            f"or a {SPECTRA_FILE} path"
        )
    found = sorted(run.rglob(SPECTRA_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"{run}: no {SPECTRA_FILE} under this directory. Fix: train with the callback "
            "msplora.analysis.SpectrumRecorder (trainer callbacks), or pass the right run directory"
        )
    return found[-1]


def load_spectra(path: str | Path) -> dict:
    doc = read_json(path, "spectra file", fix="rerun the fit, or pass another run", error=ValueError)
    if not isinstance(doc, dict) or not doc.get("records"):
        raise ValueError(f"{path}: holds no spectrum records. Fix: let the run finish at least one epoch")
    return doc


# -- plots ----------------------------------------------------------------------------------
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


# -- entry ----------------------------------------------------------------------------------
def _summary_md(summary: dict) -> str:
    lines = [
        f"# Spectrum analysis of `{summary['run']}`",
        "",
        f"Epochs recorded: {summary['epochs']}; figures below use epoch {summary['epoch']}.",
        "",
        "## Effective rank per level (Roy & Vetterli; mean over cells, min-max)",
        "",
        "| level | kind | rank | cells | effective rank | min-max |",
        "|---|---|---|---|---|---|",
    ]
    ranks = {lv["name"]: lv["rank"] for lv in summary["levels"]}
    for level, kinds in summary["effective_rank"].items():
        for kind, cells in kinds.items():
            v = list(cells.values())
            lines.append(
                f"| {level} | {kind} | {ranks.get(level, '?')} | {len(v)} | {np.mean(v):.3f} | "
                f"{min(v):.3f}-{max(v):.3f} |"
            )
    lines += ["", "## Mean adjacent-layer KL of whole-layer spectra", ""]
    against = summary.get("against")
    if against:
        lines += [
            f"Against `{against['run']}`; difference > 0: MSPLoRA separates layers more.",
            "",
            "| kind | MSPLoRA | LoRA | difference | mean KL difference (all pairs) |",
            "|---|---|---|---|---|",
        ]
        for kind, v in summary["mean_adjacent_kl"].items():
            if kind in against["mean_adjacent_kl"]:
                lines.append(
                    f"| {kind} | {v:.4f} | {against['mean_adjacent_kl'][kind]:.4f} | "
                    f"{against['adjacent_difference'][kind]:+.4f} | {against['mean_difference'][kind]:+.4f} |"
                )
            else:
                lines.append(f"| {kind} | {v:.4f} | absent | | |")
    else:
        lines += ["| kind | mean adjacent KL |", "|---|---|"]
        lines += [f"| {kind} | {v:.4f} |" for kind, v in summary["mean_adjacent_kl"].items()]
    lines += ["", "## Figures", ""] + [f"* `{Path(p).name}`" for p in summary["plots"]]
    return "\n".join(lines) + "\n"


def analyze(run: str, against: str | None = None, out: str | None = None) -> dict:
    """Analyse a run's spectra.json: PNGs + summary.md into ``out`` (default ``<run>/analysis``).

    Args:
        run: run directory (the newest spectra.json under it is used) or a spectra.json path.
        against: a LoRA run (directory or spectra.json) to compare layer KL with.
        out: output directory.

    Returns:
        The summary as a dict (also printed, and written as summary.md).
    """
    path = find_spectra(run)
    doc = load_spectra(path)
    lora_path = find_spectra(against) if against is not None else None  # read both before writing anything
    lora_doc = load_spectra(lora_path) if lora_path is not None else None
    if lora_doc is not None:
        mine, theirs = layer_kl(doc["records"][-1]), layer_kl(lora_doc["records"][-1])
        for kind in sorted(mine.keys() & theirs.keys()):
            if mine[kind][0] != theirs[kind][0]:
                raise ValueError(
                    f"{kind}: layers {mine[kind][0]} vs {theirs[kind][0]} in {lora_path}. Fix: compare runs of one model"
                )
    out_dir = Path(out) if out else (Path(run) if Path(run).is_dir() else path.parent) / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    last = doc["records"][-1]

    plots = [
        plot_level_spectra(doc, lv["name"], out_dir / f"spectrum_{_safe(lv['name'])}.png")
        for lv in doc["levels"]
        if lv["name"] in _level_spectra(last)
    ]
    kls = layer_kl(last)
    for kind, (ids, m) in kls.items():
        plots.append(
            plot_matrix(
                m, ids, f"KL between layer spectra\n{kind}, epoch {last['epoch']}", out_dir / f"kl_{_safe(kind)}.png"
            )
        )
    summary: dict[str, Any] = {
        "run": str(path),
        "epochs": [r["epoch"] for r in doc["records"]],
        "epoch": last["epoch"],
        "levels": doc["levels"],
        "effective_rank": effective_ranks(last),
        "mean_adjacent_kl": {kind: mean_adjacent_kl(m) for kind, (_, m) in kls.items()},
        "plots": [],
    }
    if lora_doc is not None:
        lora_last = lora_doc["records"][-1]
        lora_kls = layer_kl(lora_last)
        cmp: dict[str, Any] = {
            "run": str(lora_path),
            "mean_adjacent_kl": {},
            "adjacent_difference": {},
            "mean_difference": {},
        }
        for kind, (ids, m) in kls.items():
            if kind not in lora_kls:
                continue
            _, lora_m = lora_kls[kind]  # same layers: checked before anything was written
            diff = kl_difference(m, lora_m)
            cmp["mean_adjacent_kl"][kind] = mean_adjacent_kl(lora_m)
            cmp["adjacent_difference"][kind] = mean_adjacent_kl(m) - mean_adjacent_kl(lora_m)
            off = ~np.eye(len(ids), dtype=bool)
            cmp["mean_difference"][kind] = float(diff[off].mean()) if off.any() else 0.0
            plots.append(
                plot_matrix(
                    diff,
                    ids,
                    f"KL MSPLoRA - LoRA, {kind}\n(> 0: MSPLoRA layers more distinct)",
                    out_dir / f"kl_diff_{_safe(kind)}.png",
                    diverging=True,
                )
            )
        summary["against"] = cmp
    summary["plots"] = [str(p) for p in plots]
    text = _summary_md(summary)
    (out_dir / "summary.md").write_text(text)
    summary["summary_md"] = str(out_dir / "summary.md")
    print(text)
    return summary


def main(argv: list[str] | None = None) -> None:
    """``msplora analyze RUN [--against LORA_RUN] [--out DIR]``."""
    parser = ArgumentParser(
        prog="msplora analyze",
        description="Spectra of a run's adapter updates (written by SpectrumRecorder): "
        "per-level singular values, layer-to-layer KL, and the difference against a LoRA run.",
    )
    parser.add_argument("run", metavar="RUN", help="run directory (searched for spectra.json) or a spectra.json path")
    parser.add_argument("--against", metavar="LORA_RUN", help="LoRA run to compare layer KL with")
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN/analysis)")
    args = parser.parse_args(argv)
    try:
        analyze(args.run, against=args.against, out=args.out)
    except (FileNotFoundError, ValueError) as e:  # "problem. Fix: ...": one line via msplora.errors
        raise SystemExit(f"msplora analyze: error: {e}") from None
