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

Modules (each imports only those above it)::

    recording   singular values of a model's adapter (record_spectra, low_rank_svdvals)
    callback    SpectrumRecorder (the class path in configs: msplora.analysis.SpectrumRecorder)
    numerics    normalize, kl, kl_matrix, effective ranks (pure numpy)
    files       find_spectra, load_spectra
    plots       PNG figures
    report      analyze() and the `msplora analyze` command line (main)
"""

from __future__ import annotations

from msplora.analysis.callback import SpectrumRecorder, find_adapted_model
from msplora.analysis.files import find_spectra, load_spectra
from msplora.analysis.numerics import (
    EPS,
    effective_rank,
    effective_ranks,
    kl,
    kl_difference,
    kl_matrix,
    layer_kl,
    mean_adjacent_kl,
    normalize,
)
from msplora.analysis.plots import plot_level_spectra, plot_matrix
from msplora.analysis.recording import SPECTRA_FILE, level_info, low_rank_svdvals, record_spectra
from msplora.analysis.report import analyze, main

__all__ = [
    "EPS",
    "SPECTRA_FILE",
    "SpectrumRecorder",
    "analyze",
    "effective_rank",
    "effective_ranks",
    "find_adapted_model",
    "find_spectra",
    "kl",
    "kl_difference",
    "kl_matrix",
    "layer_kl",
    "level_info",
    "load_spectra",
    "low_rank_svdvals",
    "main",
    "mean_adjacent_kl",
    "normalize",
    "plot_level_spectra",
    "plot_matrix",
    "record_spectra",
]
