"""The peft layer: a thin ``BaseTunerLayer`` view of the core's wrapped layer."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from msplora.layers import MSPLoRALinear


# -- layer ----------------------------------------------------------------------------------
class MSPLoRAPeftLayer(nn.Module, BaseTunerLayer):
    """peft's view of one wrapped map. ``base_layer`` is the core's :class:`MSPLoRALinear`
    (so ``get_base_layer()`` reaches the frozen linear map through it); forward and merge are
    the core's. The A/B live in the model-level bank, so this layer owns no tensors, and its
    state (active, disabled, merged) is the core layer's."""

    adapter_layer_names: tuple[str, ...] = ()  # no per-layer adapter tensors (see class docstring)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, core: MSPLoRALinear, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = core
        self.adapter_name = adapter_name

    @property
    def core(self) -> MSPLoRALinear:
        return self.base_layer

    # peft's public state, read from the core (peft's private _active_adapter /
    # _disable_adapters are never written)
    @property
    def active_adapter(self) -> list[str]:
        return [self.adapter_name]

    @property
    def disable_adapters(self) -> bool:
        return self.core.disabled

    @property
    def merged_adapters(self) -> list[str]:
        return [self.adapter_name] if self.core.merged else []

    def _check_names(self, names: str | list[str] | None) -> None:
        names = [names] if isinstance(names, str) else list(names or [])
        unknown = [n for n in names if n != self.adapter_name]
        if unknown:
            raise ValueError(
                f"adapter {unknown} is not on this layer: MSPLoRA holds one adapter per model "
                f"({self.adapter_name!r}). Fix: use {self.adapter_name!r}, or load other adapters into another base model"
            )

    def _get_available_adapters(self) -> set[str]:
        return {self.adapter_name}

    def _all_available_adapter_names(self) -> list[str]:
        return [self.adapter_name]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        self._check_names(adapter_names)
        self.core.bank.requires_grad_(not inference_mode)  # shared: every layer of the kind sets the same

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self._check_names(adapter_names)
        self.core.bank.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self.core.disabled = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self._check_names(adapter_names)
        self.core.merge(safe=safe_merge)

    def unmerge(self) -> None:
        self.core.unmerge()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:  # as peft's LoRA: a disabled adapter leaves W bare
            self.unmerge()
        return self.core(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}"
