"""``SpectrumRecorder``: the Lightning callback that writes ``<log_dir>/spectra.json``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from torch import nn

from msplora.analysis.recording import SPECTRA_FILE, level_info, record_spectra
from msplora.io import write_json_atomic
from msplora.layers import PREFIX
from msplora.sharding import unsharded


def find_adapted_model(module: nn.Module) -> nn.Module:
    """``module.model`` if it holds the adapter, else the first submodule that does."""
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, PREFIX):
        return inner
    for m in module.modules():
        if hasattr(m, PREFIX):
            return m
    raise RuntimeError(
        f"SpectrumRecorder: no submodule of {type(module).__name__} holds an MSPLoRA adapter ({PREFIX}). "
        "Fix: inject the adapter before fit (msplora.inject), or add the callback to MSPLoRA runs only"
    )


class SpectrumRecorder(Callback):
    """Record adapter spectra at each training epoch end into ``<log_dir>/spectra.json``.

    Args:
        filename: file name inside the trainer's log dir (``default_root_dir`` without a logger).
        record_init: also record once at fit start as epoch -1. Off by default: at LoRA
            init B = 0, so every singular value is 0.
        every_n_steps: also record every N optimizer steps (0 = epoch ends only), for
            short runs whose whole training is one epoch. Each record carries its ``step``.
    """

    def __init__(self, filename: str = SPECTRA_FILE, record_init: bool = False, every_n_steps: int = 0) -> None:
        self.filename = filename
        self.record_init = record_init
        self.every_n_steps = every_n_steps
        self.records: list[dict] = []
        self.path: Path | None = None

    @property
    def state_key(self) -> str:  # two recorders (different files) may share one Trainer
        return self._generate_state_key(filename=self.filename)

    def on_fit_start(self, trainer, pl_module) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank must ask, or DDP hangs.
        log_dir = trainer.log_dir or trainer.default_root_dir
        self.path = Path(log_dir) / self.filename
        self._model = find_adapted_model(pl_module)
        if self.record_init:
            self._record(trainer, -1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._record(trainer, trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            self._record(trainer, trainer.current_epoch)

    def _record(self, trainer, epoch: int) -> None:
        with unsharded(self._model):  # FSDP: the whole bank, gathered on every rank (a collective)
            if not trainer.is_global_zero:  # DDP replicas hold the same adapter
                return
            spectra = record_spectra(self._model)
        step = trainer.global_step
        self.records = [r for r in self.records if r.get("step") != step]  # a resumed step replaces
        self.records.append({"epoch": epoch, "step": step, **spectra})
        write_json_atomic(self.path, indent=None, obj={"levels": level_info(self._model), "records": self.records})

    # Records travel in checkpoints, so a resumed run keeps the earlier epochs in its file.
    def state_dict(self) -> dict:
        return {"records": self.records}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = list(state_dict.get("records", []))
