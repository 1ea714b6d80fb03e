"""A seeded, stratified held-out split of a dataset (the same on every machine)."""

from __future__ import annotations

import datasets
import numpy as np

from msplora.errors import DataError


def holdout_split(
    ds: datasets.Dataset,
    fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (kept, held-out ``fraction``), per label class if ``stratify``.

    numpy's PCG64 generator makes the split the same on every machine; both parts keep file order.
    (``Dataset.train_test_split(stratify_by_column=...)`` reads the labels row by row: minutes on MNLI.)
    """
    labels = ds.with_format("arrow")["label"].to_numpy() if stratify else np.zeros(len(ds))
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        held.append(rows[: int(fraction * len(rows) + 0.5)])
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(ds)), held)
    if len(held) == 0 or len(kept) == 0:
        raise DataError(
            f"holding out {fraction} of {len(ds)} rows leaves an empty part. Fix: choose a fraction in (0, 1) "
            "that gives each part at least one row"
        )
    return ds.select(kept), ds.select(held)
