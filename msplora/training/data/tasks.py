"""The task registry: one ``TaskSpec`` a task (columns, labels, splits, metrics), in the layout
of the Hub dataset ``nyu-mll/glue``. A new task is one entry of ``TASKS`` (plus, for a built-in,
its loader in :mod:`msplora.training.data.builtin`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from msplora.errors import DataError

HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """One task: its columns, labels, splits and metrics, in the ``nyu-mll/glue`` layout."""

    name: str
    text_fields: tuple[str, ...]
    """One or two text columns, fed to the tokenizer as a single text or a pair."""
    label_names: tuple[str, ...]
    """Class names in label-id order; empty for a regression task."""
    metrics: tuple[str, ...]
    """Metrics reported for the task: keys from accuracy, f1, matthews, pearson, spearman."""
    metric: str
    """The metric used for model selection; one of ``metrics``."""
    eval_splits: tuple[str, ...] = ("validation",)
    train_split: str = "train"
    label_range: tuple[float, float] | None = None
    """Regression only: allowed label interval."""
    glue_folder: str | None = None
    """Folder name in the original GLUE layout (``CoLA``, ``SST-2``...); None for built-ins."""
    tsv_columns: dict[str, str] = field(default_factory=dict)
    """Original GLUE column -> ``nyu-mll/glue`` column, where the names differ."""
    tsv_header: tuple[str, ...] | None = None
    """Column names for original files that have no header row (CoLA)."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"TaskSpec {self.name}: text_fields must hold 1 or 2 columns")
        if self.metric not in self.metrics:
            raise ValueError(f"TaskSpec {self.name}: metric {self.metric!r} is not in metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        """Size of the model's output: number of classes, or 1 for regression."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def splits(self) -> tuple[str, ...]:
        return (self.train_split, *self.eval_splits)


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews",),
            "matthews",
            glue_folder="CoLA",
            tsv_header=("source", "label", "original_label", "sentence"),
        ),
        TaskSpec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", glue_folder="SST-2"),
        TaskSpec(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "f1",
            glue_folder="MRPC",
            tsv_columns={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            glue_folder="QQP",
            tsv_columns={"is_duplicate": "label"},
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman"),
            "pearson",
            label_range=(0.0, 5.0),
            glue_folder="STS-B",
            tsv_columns={"score": "label"},
        ),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            eval_splits=("validation_matched", "validation_mismatched"),
            glue_folder="MNLI",
            tsv_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ),
        TaskSpec("qnli", ("question", "sentence"), _NLI, ("accuracy",), "accuracy", glue_folder="QNLI"),
        TaskSpec("rte", ("sentence1", "sentence2"), _NLI, ("accuracy",), "accuracy", glue_folder="RTE"),
        # WNLI's files say 0/1, and 1 means entailment: the Hub's order is reversed against RTE's.
        TaskSpec(
            "wnli",
            ("sentence1", "sentence2"),
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
            glue_folder="WNLI",
        ),
        # Built-ins: shipped inside installed wheels, so they work offline.
        TaskSpec("sentiment", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
        TaskSpec("boolq", ("question", "passage"), ("False", "True"), ("accuracy",), "accuracy"),
    ]
}
GLUE_TASKS = tuple(n for n, s in TASKS.items() if s.glue_folder)


def get_task(task: str) -> TaskSpec:
    """The ``TaskSpec`` of ``task`` (case-insensitive), or a ``DataError`` listing the valid names."""
    spec = TASKS.get(task.lower().replace("-", ""))
    if spec is None:
        raise DataError(f"unknown task {task!r}. Fix: choose one of: {', '.join(TASKS)}")
    return spec
