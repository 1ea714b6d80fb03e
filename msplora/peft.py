"""MSPLoRA as a native ``peft`` method: ``import msplora.peft`` registers it.

    get_peft_model(model, MSPLoRAPeftConfig(targets=[...]))      msplora.inject(model, MSPLoRAConfig(...))
                    |                                                           |
        MSPLoRAPeftModel (peft BaseTuner)                                       |
          inject_adapter --------------------------------------------> msplora.inject (the core)
                    |                                                           |
        MSPLoRAPeftLayer (peft BaseTunerLayer)  --base_layer-->  MSPLoRALinear --base_layer--> nn.Linear / Conv1D
                                                                       |  (forward, merge: the core's)
                                                      model.msplora_bank (each shared A/B once)

Two doors, one implementation: the peft layer is a thin view that peft's machinery can
see (enable/disable, merge, status); the forward, the merge and the adapter file layout are
the core's (``MSPLoRALinear``, ``adapter_state_dict``). peft's ``save_pretrained`` writes the
core's tensors (each shared tensor once) under the ``msplora.`` namespace, beside peft's own
``modules_to_save`` keys for task heads.

Limits of peft's public API, and what this module does about them (peft's minor is pinned
in pyproject.toml because of them):

* ``register_peft_method`` only accepts names that are already members of ``PeftType``, an
  ``Enum`` that has no public way to grow. :func:`_peft_type` adds ``PeftType.MSPLORA``
  through the ``enum`` module's member tables.
* Saving and loading a method's tensors go through the tuner class hooks
  ``_get_adapter_state_dict``, ``_remove_adapter_name_from_key`` and
  ``_remap_adapter_state_dict_for_load``, which peft documents as its internal extension
  points for tuners (VeRA and VB-LoRA use them for their shared tensors).

One adapter per model: the bank is per model, so ``add_adapter`` / ``load_adapter`` of a
second MSPLoRA adapter raise a :class:`msplora.ConfigError` that says so (peft rolls the
failed addition back); two pyramids are never mixed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method, set_additional_trainable_modules
from torch import nn

from msplora.config import ConfigError, Level, MSPLoRAConfig, paper_levels
from msplora.inject import (
    PREFIX as BANK_ATTR,
)
from msplora.inject import (
    _copy_in,
    _set_module,
    adapter_state_dict,
    get_bank,
    inject,
    release_save_guard,
    unmerge,
    wrapped_layers,
)
from msplora.layers import MSPLoRABank, MSPLoRALinear

__all__ = ["PEFT_TYPE", "MSPLoRAPeftConfig", "MSPLoRAPeftLayer", "MSPLoRAPeftModel"]

METHOD = "msplora"  # peft method name; the PeftType member is METHOD.upper()
KEY_NS = "msplora."  # namespace of the core's tensors in a peft-saved adapter_model.safetensors


def _peft_type(name: str) -> PeftType:
    """``PeftType[name]``, added to the enum if missing.

    peft's public API cannot do this: ``register_peft_method`` refuses names that are not
    already ``PeftType`` members, and an ``Enum`` cannot be extended after creation. We add
    the member to the three tables ``Enum`` looks members up in (by name, by value, in
    order) -- the ``enum`` module's private layout, stable from Python 3.11 to 3.13.
    """
    try:
        return PeftType(name)
    except ValueError:
        pass
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)  # PeftType.MSPLORA
    return member


PEFT_TYPE = _peft_type(METHOD.upper())


# -- config ---------------------------------------------------------------------------------
@dataclass
class MSPLoRAPeftConfig(PeftConfig):
    """peft config of an MSPLoRA pyramid: the fields and defaults of :class:`msplora.MSPLoRAConfig`.

    Args:
        targets: module names to adapt (``["query", "value"]``), or one regex over the full name.
        levels: ordered coarse -> fine, as ``Level`` objects or dicts; default: the paper's
            global r=8 / mid r=4 (3 groups) / layer r=2, alpha 16 each.
        ranks: shortcut: explicit rank per level.
        r0, decay: shortcut: first level's rank and the geometric decay (0.5 halves).
        dropout: dropout on the adapter input, one mask shared by all levels.
        fan_in_fan_out: base weights stored (d_in, d_out) as GPT-2's Conv1D; None detects it.
        init: ``lora`` (A kaiming-uniform, B zero) or ``gaussian``.
        modules_to_save: extra modules trained in full and saved (task heads); peft adds the
            classifier of a ``SEQ_CLS`` model itself, as for its own LoRA.
        task_type: peft's task type (``SEQ_CLS``, ``CAUSAL_LM``, ...).

    Validation is the core's (``MSPLoRAConfig.__post_init__``): errors name the field and the fix.
    """

    targets: list[str] | str = field(
        default_factory=lambda: ["query", "value"], metadata={"help": "module names to adapt, or one regex"}
    )
    levels: list[Level] = field(default_factory=paper_levels, metadata={"help": "pyramid levels, coarse to fine"})
    ranks: list[int] | None = field(default=None, metadata={"help": "explicit rank per level"})
    r0: int | None = field(default=None, metadata={"help": "rank of the first level (with decay)"})
    decay: float | None = field(default=None, metadata={"help": "geometric rank decay between levels"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input (one mask, all levels)"})
    fan_in_fan_out: bool | None = field(default=None, metadata={"help": "Conv1D-style weights; None detects"})
    init: str = field(default="lora", metadata={"help": "lora or gaussian"})
    modules_to_save: list[str] | None = field(
        default_factory=list, metadata={"help": "extra modules trained in full and saved (task heads)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        core = self.to_msplora()  # the one validation; folds ranks / r0 + decay into the levels
        self.targets, self.levels = core.targets, core.levels
        self.ranks = self.r0 = self.decay = None

    @property
    def target_modules(self) -> list[str] | str:
        """peft's name for ``targets`` (read by peft's generic save code)."""
        return self.targets

    def to_msplora(self, modules_to_save: list[str] | None = None) -> MSPLoRAConfig:
        """The core config (``modules_to_save`` overrides the config's own)."""
        return MSPLoRAConfig(
            targets=copy.deepcopy(self.targets),
            levels=[lv if isinstance(lv, Level) else Level(**lv) for lv in copy.deepcopy(self.levels)],
            ranks=self.ranks,
            r0=self.r0,
            decay=self.decay,
            dropout=self.dropout,
            fan_in_fan_out=self.fan_in_fan_out,
            init=self.init,
            modules_to_save=list(self.modules_to_save or []) if modules_to_save is None else modules_to_save,
        )

    @classmethod
    def from_msplora(cls, config: MSPLoRAConfig, **peft_fields: Any) -> MSPLoRAPeftConfig:
        """The peft config of a core config; ``peft_fields`` sets e.g. ``task_type``."""
        d = config.to_dict()
        d["levels"] = [Level(**lv) for lv in d["levels"]]
        return cls(**d, **peft_fields)


# -- layer ----------------------------------------------------------------------------------
class MSPLoRAPeftLayer(nn.Module, BaseTunerLayer):
    """peft's view of one wrapped map. ``base_layer`` is the core's :class:`MSPLoRALinear`
    (so ``get_base_layer()`` reaches the frozen linear map through it); forward and merge are
    the core's. The A/B live in the model-level bank, so this layer owns no tensors."""

    adapter_layer_names: tuple[str, ...] = ()  # no per-layer adapter tensors (see class docstring)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, core: MSPLoRALinear, adapter_name: str) -> None:
        super().__init__()
        self.base_layer = core
        self.adapter_name = adapter_name
        self._active_adapter = [adapter_name]
        self._disable_adapters = False

    @property
    def core(self) -> MSPLoRALinear:
        return self.base_layer

    @property
    def merged_adapters(self) -> list[str]:  # the core's flag is the one source of truth
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
        self._active_adapter = [self.adapter_name]

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        self._check_names(adapter_names)
        self.core.bank.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
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


# -- tuner ----------------------------------------------------------------------------------
def _bank_owner(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the module that holds the bank (the transformers model)."""
    for name, mod in model.named_modules():
        if isinstance(mod, MSPLoRABank):
            owner = name.rpartition(".")[0]
            return owner, model.get_submodule(owner) if owner else model
    raise ConfigError("model: has no MSPLoRA adapter. Fix: build it with get_peft_model(model, MSPLoRAPeftConfig(...))")


class MSPLoRAPeftModel(BaseTuner):
    """peft tuner for MSPLoRA: injection, state dict and unloading go through the core."""

    prefix: str = "msplora_"
    tuner_layer_cls = MSPLoRAPeftLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state: bool = True  # the bank is model-level: no `inject_adapter_in_model`

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject through the core (``msplora.inject`` plans every kind's bank at once, which
        peft's module-by-module ``_create_and_replace`` cannot), then wrap each core layer in
        the peft view. Refuses a second adapter before changing anything."""
        if get_bank(model, required=False) is not None:
            others = sorted(n for n in self.peft_config if n != adapter_name)
            raise ConfigError(
                f"adapter {adapter_name!r}: this model already holds the MSPLoRA adapter {others}, and MSPLoRA "
                "supports one adapter per model (add_adapter / load_adapter of a second one is not supported). "
                "Fix: merge_and_unload() or unload() first, or load the second adapter into another base model"
            )
        config = self.peft_config[adapter_name]
        # Heads go through peft's own ModulesToSaveWrapper (set below), as for peft's LoRA.
        inject(model, config.to_msplora(modules_to_save=[]))
        names = []
        for name, core in list(wrapped_layers(model)):
            _set_module(model, name, MSPLoRAPeftLayer(core, adapter_name))
            names.append(name)
        self.targeted_module_names.extend(n for n in names if n not in self.targeted_module_names)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )

    def _create_and_replace(self, *args, **kwargs) -> None:  # abstract in BaseTuner; injection is whole-model
        raise NotImplementedError("MSPLoRA injects all targets at once in inject_adapter")

    def delete_adapter(self, adapter_name: str) -> None:
        raise ConfigError(
            f"adapter {adapter_name!r}: MSPLoRA holds one adapter per model, so it cannot be deleted while the "
            "model stays a PeftModel. Fix: call unload() (or merge_and_unload()) to get the base model back"
        )

    # -- unloading: peft's walk replaces each layer by get_base_layer(); the bank goes after --
    def _finish_unload(self) -> nn.Module:
        if get_bank(self.model, required=False) is not None:
            delattr(self.model, BANK_ATTR)
        release_save_guard(self.model)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge every delta into its base weight and return the plain transformers model."""
        layers = [m for m in self.model.modules() if isinstance(m, MSPLoRAPeftLayer)]
        for layer in layers:
            layer._check_names(adapter_names)
        if safe_merge:  # check every layer before merging any: a refusal changes nothing
            for layer in layers:
                if not layer.core.merged:
                    w = layer.core.base_layer.weight
                    if not torch.isfinite(w + layer.core.delta_weight().to(w.dtype)).all():
                        raise ConfigError(
                            f"merge: the delta of {layer.core.kind} at layer {layer.core.layer_id} gives non-finite "
                            "weights; nothing merged. Fix: look for inf/NaN in the adapter before merging"
                        )
        super().merge_and_unload(progressbar=progressbar, safe_merge=False, adapter_names=adapter_names)
        return self._finish_unload()

    def unload(self) -> nn.Module:
        """Remove the adapter (unmerging a merged one first) and return the base model."""
        unmerge(self.model)
        super().unload()
        return self._finish_unload()

    # -- state dict: the core's layout, each shared tensor once -----------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # The core's tensors are read from the live bank (not from `state_dict`): sharded
        # (FSDP / ZeRO-3) saves are not supported by this method.
        _, owner = _bank_owner(model)
        return {KEY_NS + k: v for k, v in adapter_state_dict(owner).items()}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The bank's keys hold no adapter name; a level or kind that happens to equal it must stay.
        return key if key.startswith(KEY_NS) else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint (the core's per-level tensors) -> the bank's parameters, through the core's
        own ``_copy_in`` so the layout has one implementation. The model is left unchanged here
        (peft's ``load_state_dict`` that follows writes the result)."""
        ours = {k.removeprefix(KEY_NS): v for k, v in state_dict.items() if k.startswith(KEY_NS)}
        rest = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, {k: v for k, v in state_dict.items() if not k.startswith(KEY_NS)}
        )
        owner_name, owner = _bank_owner(model)
        expected = adapter_state_dict(owner)
        missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        bad_shape = [k for k in expected if k in ours and ours[k].shape != expected[k].shape]
        if missing or unexpected or bad_shape:
            raise ConfigError(
                f"adapter tensors do not fit this model (missing {missing}, unexpected {unexpected}, "
                f"wrong shape {bad_shape}). Fix: load the adapter into the base model it was trained on"
            )
        bank = get_bank(owner)
        live = {n: p.detach().clone() for n, p in bank.named_parameters()}
        with torch.no_grad():
            _copy_in(owner, ours)
            loaded = {n: p.detach().clone() for n, p in bank.named_parameters()}
            for n, p in bank.named_parameters():
                p.copy_(live[n])
        bank_key = f"{owner_name}.{BANK_ATTR}" if owner_name else BANK_ATTR
        rest.update({f"{bank_key}.{n}": t for n, t in loaded.items()})
        return rest


if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:  # once per process, even if this module is reloaded
    register_peft_method(
        name=METHOD, config_cls=MSPLoRAPeftConfig, model_cls=MSPLoRAPeftModel, prefix=MSPLoRAPeftModel.prefix
    )
