"""Paired comparisons of two arms from their runs' per-example dev predictions.

    arm A, seeds 0..n-1 ─┐  same seed index, same dev examples
    arm B, seeds 0..n-1 ─┴─> d_s = metric(A_s) - metric(B_s)        d = mean_s d_s
        var(d) = seed part (spread of the d_s; shrinks with more seeds)
               + example part (paired bootstrap over the dev examples, the same draw for both arms
                 and every seed; fixed by the dev set's size)
    -> 95 % CI and p-value (t with n-1 df), the smallest difference detectable at 80 % power,
       and a verdict against a margin fixed before the runs.

Why both levels: a seed's training noise and the dev set's finite sample both move a score;
only seeds (the usual "mean ± std") ignores that every arm is scored on the same 408 MRPC pairs
(a claim about MRPC, not about these 408), and only examples ignores that another seed trains
another model. With few seeds a bootstrap over seeds underestimates their variance by (n-1)/n
and its percentiles give too many false positives, so the seed part is the sample variance and
the interval a t interval (tests/test_stats.py checks the false-positive rate on null data).

Metrics are written for example weights (bootstrap counts), vectorised over replicates: the
accuracy, F1 of the positive class, Matthews correlation, Pearson and Spearman of GLUE.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Comparison", "METRICS", "compare", "metric_value", "verdict"]

Arm = Sequence[tuple[np.ndarray, np.ndarray]]  # per seed: (pred, label), same examples in the same order

MAX_SEEDS = 1000  # beyond this, "more seeds" is no answer: the dev set's size limits the comparison


# -- metrics over example weights: w (B, m) -> (B,) ----------------------------------------------------
def _accuracy(p, y, w):
    return (w * (p == y)).sum(1) / w.sum(1)


def _f1(p, y, w):
    tp = (w * ((p == 1) & (y == 1))).sum(1)
    fp = (w * ((p == 1) & (y != 1))).sum(1)
    fn = (w * ((p != 1) & (y == 1))).sum(1)
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=float), where=den > 0)


def _matthews(p, y, w):
    k = int(max(p.max(), y.max())) + 1
    s = w.sum(1)
    c = (w * (p == y)).sum(1)
    pk = np.stack([(w * (p == j)).sum(1) for j in range(k)], 1)  # predicted count per class
    tk = np.stack([(w * (y == j)).sum(1) for j in range(k)], 1)  # true count per class
    num = c * s - (pk * tk).sum(1)
    den = np.sqrt((s**2 - (pk**2).sum(1)) * (s**2 - (tk**2).sum(1)))
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def _pearson(p, y, w):
    s = w.sum(1)
    mp, my = (w * p).sum(1) / s, (w * y).sum(1) / s
    dp, dy = p - mp[:, None], y - my[:, None]
    cov = (w * dp * dy).sum(1)
    den = np.sqrt((w * dp**2).sum(1) * (w * dy**2).sum(1))
    return np.divide(cov, den, out=np.zeros_like(cov, dtype=float), where=den > 0)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation uses."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    uniq, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=ranks)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def _spearman(p, y, w):
    # Ranks of the whole dev set, then the weighted Pearson of the ranks: exact for the full set
    # (w = 1); a bootstrap replicate keeps the original ranks, the usual approximation.
    return _pearson(_ranks(p[0])[None, :], _ranks(y[0])[None, :], w)


METRICS = {"accuracy": _accuracy, "f1": _f1, "matthews": _matthews, "pearson": _pearson, "spearman": _spearman}


def metric_value(name: str, pred: np.ndarray, label: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``name`` of (pred, label) under example weights (B, m) -> (B,); without weights, a float."""
    if name not in METRICS:
        raise ValueError(f"no paired statistics for metric {name!r}. Fix: use one of {', '.join(METRICS)}")
    w = np.ones((1, len(pred))) if weights is None else weights
    out = METRICS[name](np.asarray(pred)[None, :], np.asarray(label)[None, :], w)
    return float(out[0]) if weights is None else out


# -- the comparison -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Arm A against arm B, in the metric's units (0.01 = 1 point)."""

    metric: str
    n_seeds: int
    n_examples: int
    diff: float  # mean over seeds of metric(A_s) - metric(B_s)
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    mde: float  # smallest |difference| detectable at 80 % power, two-sided 0.05, at this n
    margin: float
    verdict: str  # better | worse | equivalent | undecided
    more_seeds: int | None  # undecided: about this many more seeds would decide; None: seeds cannot
    seed_var: float  # variance of one seed's d_s (training noise); var(d) = seed_var / n + example_var
    example_var: float  # the dev set's part of var(d): more seeds do not shrink it

    def describe(self) -> str:
        return describe(self)


def _t(df: float):
    from scipy import stats

    return stats.t(df) if math.isfinite(df) else stats.norm()


def verdict(diff: float, se: float, df: float, margin: float) -> tuple[str, float, float]:
    """(verdict, ci_low, ci_high): better / worse when the 95 % CI excludes 0, equivalent when it
    lies inside (-margin, +margin), else undecided."""
    half = _t(df).ppf(0.975) * se
    lo, hi = diff - half, diff + half
    if lo > 0:
        return "better", lo, hi
    if hi < 0:
        return "worse", lo, hi
    if -margin < lo and hi < margin:
        return "equivalent", lo, hi
    return "undecided", lo, hi


def _seeds_to_decide(diff: float, seed_var: float, example_var: float, n: int, margin: float) -> int | None:
    """Smallest n' > n at which the same difference, with the variance split as measured, gets a
    verdict; None when even MAX_SEEDS would not (the example part alone keeps the CI too wide)."""
    for n2 in range(n + 1, MAX_SEEDS + 1):
        se2 = math.sqrt(seed_var / n2 + example_var)
        if verdict(diff, se2, n2 - 1, margin)[0] != "undecided":
            return n2
    return None


def compare(a: Arm, b: Arm, metric: str, margin: float = 0.01, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """A against B: seed k of A is paired with seed k of B (the caller aligns them), and every run
    holds the same dev examples in the same order (checked: the labels must agree)."""
    n = len(a)
    if n != len(b) or n == 0:
        raise ValueError(f"need the same number (>= 1) of paired seeds, got {len(a)} and {len(b)}")
    y0 = np.asarray(a[0][1])
    for k, (pa, ya) in enumerate(a):
        pb, yb = b[k]
        if not (len(pa) == len(pb) == len(y0)) or not (np.array_equal(ya, y0) and np.array_equal(yb, y0)):
            raise ValueError(f"seed index {k}: the runs were not scored on the same examples (labels differ)")
    m = len(y0)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot).astype(float)  # (B, m) example counts
    full = np.array([metric_value(metric, pa, y0) - metric_value(metric, pb, y0) for (pa, _), (pb, _) in zip(a, b)])
    # (n, B): each seed's difference on the same B example draws (paired across arms and seeds)
    d_boot = np.stack(
        [metric_value(metric, pa, y0, w) - metric_value(metric, pb, y0, w) for (pa, _), (pb, _) in zip(a, b)]
    )
    diff = float(full.mean())
    # Seeds x examples is a crossed design: var(d) = s2_seed/n + s2_ex/m + s2_res/(n m). The spread of
    # the per-seed d_s (ddof=1) estimates s2_seed + s2_res/m. The example bootstrap of the seed mean,
    # v_mean, estimates (s2_ex + s2_res/n)/m, and that of a single seed, v_one, (s2_ex + s2_res)/m, so
    # (v_one - v_mean)/(n-1) is s2_res/(n m), which both hold once too often. (Resampling seeds and
    # examples together, the "pigeonhole" bootstrap, counts s2_res three times and is far too
    # wide when runs are noisy per example, as fine-tuning runs are.)
    v_mean = float(d_boot.mean(0).var(ddof=1))
    if n >= 2:
        v_one = float(d_boot.var(axis=1, ddof=1).mean())
        example_var = max(v_mean - (v_one - v_mean) / (n - 1), 0.0)
        seed_var = float(full.var(ddof=1))  # per seed: s2_seed + s2_res/m
        df = n - 1
    else:  # one seed: the seed part cannot be estimated
        example_var, seed_var, df = v_mean, math.inf, math.inf
    se = math.sqrt(seed_var / n + example_var) if n >= 2 else math.inf
    if se == 0:
        p, v, lo, hi = 1.0, ("equivalent" if margin > 0 else "undecided"), diff, diff
        if diff != 0:
            p, v = 0.0, ("better" if diff > 0 else "worse")
    elif math.isinf(se):
        p, v, lo, hi = math.nan, "undecided", -math.inf, math.inf
    else:
        t = _t(df)
        p = float(2 * t.sf(abs(diff) / se))
        v, lo, hi = verdict(diff, se, df, margin)
    mde = (_t(df).ppf(0.975) + _t(df).ppf(0.8)) * se if math.isfinite(se) else math.inf
    more = None
    if v == "undecided":
        n2 = _seeds_to_decide(diff, seed_var, example_var, n, margin) if n >= 2 else None
        more = None if n2 is None else n2 - n
        if n < 2:
            more = 2 - n  # at least a second seed before anything can be said
    return Comparison(
        metric=metric,
        n_seeds=n,
        n_examples=m,
        diff=diff,
        se=se,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        mde=mde,
        margin=margin,
        verdict=v,
        more_seeds=more,
        seed_var=seed_var,
        example_var=example_var,
    )


def describe(c: Comparison) -> str:
    """The verdict in words, in points (x100)."""
    pts = lambda x: f"{100 * x:+.2f}"  # noqa: E731
    if c.verdict in ("better", "worse"):
        tail = " (by less than the margin)" if max(abs(c.ci_low), abs(c.ci_high)) < c.margin else ""
        return f"{c.verdict}{tail}"
    if c.verdict == "equivalent":
        return f"equivalent within ±{100 * c.margin:g}"
    if c.more_seeds is None:
        return (
            f"undecided (CI {pts(c.ci_low)}..{pts(c.ci_high)}; more seeds will not decide it: the dev set is too small)"
        )
    return f"undecided (about {c.more_seeds} more seed{'' if c.more_seeds == 1 else 's'})"
