"""Callbacks every fit gets: checkpoint the best, export it as an adapter, write metrics.json."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import lightning as L
import torch

import msplora
from msplora.io import write_json_atomic


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder. ``trainer.log_dir`` is a collective under DDP: call it on every rank
    (callbacks resolve it in ``setup``), never inside an ``is_global_zero`` branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _better(new: float, best: float | None, mode: str) -> bool:
    return best is None or (new > best if mode == "max" else new < best)


class BestAdapter(L.Callback):
    """Whenever the monitored metric improves, write the adapter (+ head) to ``<run>/best_adapter``."""

    def __init__(self, monitor: str, mode: str = "max", dirname: str = "best_adapter") -> None:
        self.monitor, self.mode, self.dirname = monitor, mode, dirname
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.root: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.root = run_dir(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if _better(value, self.best, self.mode):
            self.best, self.best_epoch = value, trainer.current_epoch
            if trainer.is_global_zero:
                msplora.save_adapter(
                    pl_module.model,
                    self.root / self.dirname,
                    metadata={"epoch": trainer.current_epoch, self.monitor: value},
                )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class MetricsJSON(L.Callback):
    """``<run>/metrics.json``: task, selection metric and its best value, every logged value
    at the end, trainable counts (beside LoRA r=8's), majority baseline, wall time."""

    def __init__(self, best: BestAdapter) -> None:
        self.best = best
        self.t0 = time.perf_counter()
        self.root: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.root = run_dir(trainer)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def _write(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        path = self.root / "metrics.json"
        out = json.loads(path.read_text()) if path.exists() else {}
        dm = trainer.datamodule
        spec = getattr(dm, "spec", None)
        out.update(
            task=spec.name if spec else getattr(dm.hparams, "data", None),
            model=pl_module.hparams.model,
            metric=self.best.monitor.split("/", 1)[1],
            monitor=self.best.monitor,
            **pl_module.trainable_summary(),
        )
        if stage == "fit":
            out.update(
                value=self.best.best,
                best_epoch=self.best.best_epoch,
                epochs=trainer.current_epoch,
                global_step=trainer.global_step,
                wall_time_s=round(time.perf_counter() - self.t0, 1),
            )
            baseline = majority_baseline(dm)
            if baseline is not None:
                out["majority_baseline"] = baseline
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        out.setdefault("final", {}).update(
            {k: v for k, v in final.items() if not k.startswith("train")}
            if stage == "fit"
            else {k: v for k, v in final.items() if k.startswith(stage)}
        )
        write_json_atomic(path, out)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "val")


def majority_baseline(dm) -> float | None:
    """Accuracy of always predicting the most common validation label (classification only)."""
    spec, raw = getattr(dm, "spec", None), getattr(dm, "raw", None)
    if spec is None or spec.is_regression or raw is None or "validation" not in raw:
        return None
    labels = raw["validation"]["label"]
    return max(Counter(labels).values()) / len(labels)
