"""One task as a ``DatasetDict`` in the ``nyu-mll/glue`` layout, from whichever source holds it:
a built-in, the Hub, or local files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets

from msplora.errors import DataError
from msplora.training.data.builtin import BUILTINS
from msplora.training.data.files import _from_columns, _read_split, _task_folder
from msplora.training.data.tasks import HUB_NAME, get_task


def load_task(
    task: str, data_dir: str | Path | None = None, splits: Sequence[str] | None = None
) -> datasets.DatasetDict:
    """Load ``task`` as a ``DatasetDict`` in the ``nyu-mll/glue`` layout.

    Args:
        task: a name in ``TASKS``.
        data_dir: for GLUE tasks, a folder holding ``<TASK>/train.tsv``-style original GLUE files
            (or the task folder itself), or HF-layout files ``train.<ext>`` / ``validation.<ext>``
            (``dev.<ext>`` also accepted; ext one of tsv, csv, json, jsonl, parquet). None loads
            ``nyu-mll/glue`` from the Hub. Ignored for the built-in tasks.
        splits: the splits to load; default ``spec.splits`` (train + the task's eval splits).
    """
    spec = get_task(task)
    splits = tuple(splits or spec.splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise DataError(f"{spec.name} has no split {unknown}. Fix: choose from {spec.splits}")
    if spec.name in BUILTINS:
        out = BUILTINS[spec.name](spec)
        out = datasets.DatasetDict({s: out[s] for s in splits})
    elif data_dir is None:
        out = datasets.load_dataset(HUB_NAME, spec.name)
        out = datasets.DatasetDict({s: out[s] for s in splits})  # drop the unlabelled test splits
    else:
        folder = _task_folder(spec, Path(data_dir))
        out = datasets.DatasetDict({s: _from_columns(spec, *_read_split(spec, folder, s)) for s in splits})
    for name, ds in out.items():
        if len(ds) == 0:
            raise DataError(f"{spec.name}: split {name!r} is empty. Fix: check the source file or the task's data_dir")
    return out
