"""Pure numerics on recorded spectra: distributions, KL between layers, effective ranks."""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-6  # probability mass added to every entry before KL (see `normalize`)


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
