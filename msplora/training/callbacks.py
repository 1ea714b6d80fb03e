"""Callbacks every fit gets: checkpoint the best, export it as an adapter, write metrics.json,
keep ``last.ckpt`` current, say how the run ended (status.json) and show progress."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

import msplora
from msplora.io import atomic_write, read_json, write_json_atomic
from msplora.sharding import unsharded
from msplora.training.record import RunRecord


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
        self.best_predictions: dict | None = None  # the module's validation predictions at the best value
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
            self.best_predictions = dict(getattr(pl_module, "eval_predictions", {}).get("val", {})) or None
            with unsharded(pl_module.model):  # FSDP: whole bank and head tensors (a collective)
                if trainer.is_global_zero:
                    msplora.save_adapter(
                        pl_module.model,
                        self.root / self.dirname,
                        metadata={"epoch": trainer.current_epoch, self.monitor: value},
                    )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_predictions": self.best_predictions}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.best_predictions = state.get("best_predictions")  # absent in checkpoints made before it


class MetricsJSON(L.Callback):
    """``<run>/metrics.json``: task, selection metric and its best value, every logged value
    at the end, trainable counts (beside LoRA r=8's), majority baseline, wall time."""

    def __init__(self, best: BestAdapter) -> None:
        self.best = best
        self.t0 = time.perf_counter()
        self.earlier_s = 0.0  # wall time of the fit before a resume (from the checkpoint)
        self.root: Path | None = None
        self.record: dict = {}

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.root = run_dir(trainer)
        # What metrics.json holds lives on the module (every rank), so a fit and then a test in one
        # process add to one dict, which the run API (msplora.training.run) returns without reading
        # the file back. Lightning makes new callbacks for each stage; the module stays. A run
        # folder written by another process (a resumed fit, `msplora test`) starts from its file.
        if getattr(pl_module, "run_record", None) is None:
            path = self.root / "metrics.json"
            saved = read_json(path, "the run's metrics.json") if path.is_file() else {}
            pl_module.run_record = RunRecord.from_dict(saved)
        self.record = pl_module.run_record

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def _write(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        out: RunRecord = self.record
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
                wall_time_s=round(self.earlier_s + time.perf_counter() - self.t0, 1),
            )
            baseline = majority_baseline(dm)
            if baseline is not None:
                out.update(majority_baseline=baseline)
            if self.best.best_predictions:
                out.update(predictions={**out.predictions, "val": self.best.best_predictions})
        if stage == "test" and getattr(pl_module, "eval_predictions", {}).get("test"):
            out.update(predictions={**out.predictions, "test": pl_module.eval_predictions["test"]})
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        out.update(
            final={
                **out.final,
                **(
                    {k: v for k, v in final.items() if not k.startswith("train")}
                    if stage == "fit"
                    else {k: v for k, v in final.items() if k.startswith(stage)}
                ),
            }
        )
        if trainer.is_global_zero:  # one writer; every rank keeps the record
            write_json_atomic(self.root / "metrics.json", out.to_dict())

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "val")

    def state_dict(self) -> dict:
        return {"wall_time_s": self.earlier_s + time.perf_counter() - self.t0}

    def load_state_dict(self, state: dict) -> None:
        self.earlier_s = state.get("wall_time_s", 0.0)


def majority_baseline(dm) -> float | None:
    """Accuracy of always predicting the most common validation label (classification only)."""
    spec, raw = getattr(dm, "spec", None), getattr(dm, "raw", None)
    if spec is None or spec.is_regression or raw is None or "validation" not in raw:
        return None
    labels = raw["validation"]["label"]
    return max(Counter(labels).values()) / len(labels)


# --------------------------------------------------------------------------- training state


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, fsync, then rename over it: a kill at
    any moment leaves the previous checkpoint or the new one, never half of one. (Lightning's own
    save goes through a temporary file in the system temp folder and ``shutil.move``, which is a
    copy, not a rename, when that folder is on another file system.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True, fsync=True)


def _validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates right after this training batch (its rule, from public
    attributes: every ``val_check_batch`` batches of the epoch, or of the whole fit when
    ``check_val_every_n_epoch`` is None)."""
    if not trainer.enable_validation:
        return False
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every != 0:
        return False
    interval = trainer.val_check_batch
    if interval is None or math.isinf(interval):
        return batch_idx + 1 == trainer.num_training_batches
    index = trainer.fit_loop.total_batch_idx if every is None else batch_idx
    return (index + 1) % int(interval) == 0


class LastCheckpoint(Checkpoint):
    """Keep ``<run>/checkpoints/last.ckpt`` current: the whole training state (adapter and head,
    AdamW moments, LR schedule, loop counters, the position in the data and the RNG states,
    callback states), so that ``fit --ckpt_path last`` after a crash goes on as if nothing happened.

    Written atomically every ``every_n_steps`` optimizer steps, at the end of every validation
    (``on_validation``) and when the fit ends. A step whose batch is followed by a validation is
    written after that validation, not before: Lightning resumes such a checkpoint past the
    validation, which would then never run.
    """

    def __init__(self, every_n_steps: int = 50, on_validation: bool = True, filename: str = "last.ckpt") -> None:
        """
        Args:
            every_n_steps: write every N optimizer steps (0: only at validations and the end).
            on_validation: write at the end of every validation during fit.
            filename: name inside ``<run>/checkpoints/``.
        """
        if every_n_steps < 0:
            raise msplora.ConfigError(
                f"last_checkpoint.every_n_steps: {every_n_steps} is negative. Fix: use 0 (off) or a step count"
            )
        self.every_n_steps, self.on_validation, self.filename = every_n_steps, on_validation, filename
        self.path: Path | None = None
        self.saved_step: int | None = None  # global step of the latest write in this process

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        self.path = run_dir(trainer) / "checkpoints" / self.filename
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own IO plugin stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # a collective under DDP; rank 0 writes
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self.saved_step:
            return
        stepped = (
            batch_idx + 1
        ) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
        if stepped and not (self.on_validation and _validation_follows(trainer, batch_idx)):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.on_validation and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self.saved_step and not trainer.fast_dev_run:
            self._save(trainer)


class RunStatus(L.Callback):
    """``<run>/status.json``: running (with pid and host), then finished, failed (with the error)
    or interrupted, so tools can tell a finished run from a crashed or a running one. A fresh fit
    that fails before its first step removes its run folder (it holds nothing worth keeping), and
    the parents that the fit created for it (``default_root_dir``) once they are empty.

    Args:
        root: the run folder (the CLI claims it); None = ``trainer.log_dir``.
        fresh: the folder was created for this run (not a resumed one): it may be removed.
        resumed_from: the checkpoint a resumed fit started from, recorded in the file.
        claim: the logger that claims a new run's folder when the run starts
            (``msplora.training.cli.RunFolderLogger``): its ``claimed`` folder and the parents it
            ``made`` go when the run fails before its first step, even before ``setup`` (a refusal
            in ``prepare_data``); a parent only while it is empty (another fit may use it).
    """

    def __init__(
        self,
        root: Path | None = None,
        fresh: bool = True,
        resumed_from: str | None = None,
        claim=None,
    ) -> None:
        self.root, self.fresh, self.resumed_from, self.claim = root, fresh, resumed_from, claim
        self.state: dict = {}
        self.failed = False

    def _write(self, trainer: L.Trainer, **fields) -> None:
        self.state.update(fields, global_step=trainer.global_step)
        if trainer.is_global_zero and self.root is not None and self.root.exists():
            write_json_atomic(self.root / "status.json", self.state)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        log_dir = run_dir(trainer)  # a collective under DDP: every rank asks, whether it needs it or not
        if self.root is None:
            self.root = log_dir
        history = self.state.get("history", [])
        old = self.root / "status.json"
        if trainer.is_global_zero and old.exists() and not self.state:  # a resumed run keeps what came before
            try:
                prev = json.loads(old.read_text())
                history = [*prev.get("history", []), {k: v for k, v in prev.items() if k != "history"}]
            except (OSError, ValueError):
                pass
        self.state = {
            "status": "running",
            "stage": stage,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _now(),
            "resumed_from": self.resumed_from,
            **({"history": history} if history else {}),
        }
        self._write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.failed = True
        if self.root is None and self.claim is not None:
            self.root = self.claim.claimed  # failed before setup (prepare_data): None if never claimed
        if trainer.is_global_zero and self.fresh and trainer.global_step == 0 and self.root is not None:
            if not any(self.root.glob("checkpoints/*.ckpt")):
                import shutil

                shutil.rmtree(self.root, ignore_errors=True)
                self._remove_made_parents()
                return
        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
        message = str(exception).strip().splitlines()
        error = (
            "SIGTERM"
            if isinstance(exception, SIGTERMException)
            else f"{type(exception).__name__}: {message[0] if message else ''}"
        )
        self._write(trainer, status=status, error=error, ended=_now())

    def _remove_made_parents(self) -> None:
        made = getattr(self.claim, "made", None)
        if made is None or made == self.root or made not in self.root.parents:
            return
        for folder in self.root.parents:
            try:
                folder.rmdir()  # only an empty folder goes
            except OSError:
                return
            if folder == made:
                return

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if not self.failed:
            self._write(trainer, status="finished", ended=_now())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- progress


class LineProgress(ProgressBar):
    """Progress as plain lines, for output that is not a terminal (CI logs, nohup, ``tee``),
    where a live bar prints nothing until the end: every ``every_n_steps`` optimizer steps
    (default: the trainer's ``log_every_n_steps``) one line with epoch, step, the progress-bar
    metrics (train loss), speed and ETA; one line per validation with its metrics."""

    def __init__(self, every_n_steps: int | None = None, stream=None) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self.stream = stream
        self._enabled = True
        self._t0 = self._step0 = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, file=self.stream or sys.stdout, flush=True)

    def _metrics(self, trainer, pl_module, prefix: str) -> str:
        items = self.get_metrics(trainer, pl_module)
        return " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items() if k.startswith(prefix)
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        total = trainer.estimated_stepping_batches
        self._line(f"fit: {total if math.isfinite(total) else '?'} steps, starting at step {trainer.global_step}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        step = trainer.global_step
        if step == 0 or step % every or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0  # steps / s since this fit started
        total = trainer.estimated_stepping_batches
        eta = _duration((total - step) / rate) if rate > 0 and math.isfinite(total) else "?"
        of = f"/{int(total)}" if math.isfinite(total) else ""
        self._line(
            f"epoch {trainer.current_epoch} step {step}{of} {self._metrics(trainer, pl_module, 'train')} "
            f"{rate:.2f} steps/s ETA {eta}"
        )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val", "test"))}
        text = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        self._line(f"validation at step {trainer.global_step}: {text}")

    def on_train_end(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        self._line(f"fit done: step {trainer.global_step} in {_duration(elapsed)}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def progress_bar(every_n_steps: int | None = None) -> ProgressBar:
    """The Rich bar on a terminal; lines (``LineProgress``) when stdout is a file or a pipe."""
    if sys.stdout.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar()
    return LineProgress(every_n_steps)
