"""The typed run record: what ``<run>/metrics.json`` holds, field by field.

One dataclass that the writer (:class:`~msplora.training.callbacks.MetricsJSON`), the run API's
:class:`~msplora.training.run.RunResult`, ``msplora summary`` and ``msplora export`` all go through,
so a misspelt key is a ``TypeError`` at the writer, not a silent ``None`` at a reader.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RunRecord"]


@dataclasses.dataclass
class RunRecord:
    task: str | None = None
    model: str | None = None
    metric: str | None = None  # the task's selection metric ("accuracy"; "loss" for instruction data)
    monitor: str | None = None  # its logged key ("val/accuracy")
    value: float | None = None  # best validation value of the monitor
    best_epoch: int | None = None
    epochs: int | None = None
    global_step: int | None = None
    wall_time_s: float | None = None  # the fit's wall time (across resumes)
    trainable_params: int | None = None
    adapter_params: int | None = None
    lora_r8_params: int | None = None  # plain LoRA r=8 on the same targets, with the same head
    lora_r8_adapter_params: int | None = None
    params_per_level: dict[str, int] = dataclasses.field(default_factory=dict)
    majority_baseline: float | None = None
    final: dict[str, float] = dataclasses.field(default_factory=dict)  # every logged value at the end
    predictions: dict[str, dict] = dataclasses.field(default_factory=dict)  # stage -> split -> encoded

    given: list[str] = dataclasses.field(default_factory=list, repr=False, compare=False)  # set fields, in order

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RunRecord:
        """From a metrics.json object; keys this version does not know are left out (an older or
        newer writer), a known key's value is kept as found."""
        rec = cls()
        rec.update(**{k: v for k, v in (d or {}).items() if k in _FIELDS})
        return rec

    def update(self, **fields: Any) -> None:
        """Set fields by name; an unknown name is a TypeError, as for the constructor."""
        unknown = sorted(set(fields) - _FIELDS)
        if unknown:
            raise TypeError(f"RunRecord has no field(s) {unknown}")
        for k, v in fields.items():
            setattr(self, k, v)
            if k not in self.given:
                self.given.append(k)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json object: the fields set so far, in the order first set."""
        return {k: getattr(self, k) for k in self.given}


_FIELDS = {f.name for f in dataclasses.fields(RunRecord)} - {"given"}
