"""torchmetrics per task, built from the task's spec (data.TASKS)."""

from __future__ import annotations

import torchmetrics
from torchmetrics import classification as C
from torchmetrics import regression as R

from msplora.training.data import TaskSpec


def build_metrics(spec: TaskSpec) -> torchmetrics.MetricCollection:
    """accuracy; F1 (positive class) for MRPC/QQP; Matthews for CoLA; Pearson/Spearman for STS-B."""
    n = spec.num_labels
    make = {
        "accuracy": lambda: C.MulticlassAccuracy(num_classes=n, average="micro"),
        "f1": lambda: C.BinaryF1Score(),
        "matthews": lambda: C.MatthewsCorrCoef(task="multiclass", num_classes=n),
        "pearson": lambda: R.PearsonCorrCoef(),
        "spearman": lambda: R.SpearmanCorrCoef(),
    }
    return torchmetrics.MetricCollection({name: make[name]() for name in spec.metrics})
