"""The peft config of the pyramid: the core's fields, LoRA's names, and target resolution
(``target_modules``, ``"all-linear"``, per-architecture defaults)."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import MISSING, dataclass, field
from typing import Any

from peft import PeftConfig
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig

METHOD = "msplora"  # peft method name
PEFT_TYPE = METHOD.upper()  # peft_type, a plain string (see the module docstring)
KEY_NS = "msplora."  # namespace of the core's tensors in a peft-saved adapter_model.safetensors
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear map inside the transformer blocks


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}: {problem}. Fix: {fix}")


# -- config ---------------------------------------------------------------------------------
def _with_core_fields(cls: type) -> type:
    """Give ``cls`` every field of :class:`MSPLoRAConfig` (same name, type and default) that its
    body does not redefine, then make it a dataclass: the peft config cannot drift from the core's."""
    own = dict(cls.__dict__.get("__annotations__", {}))
    core = {}
    for f in dataclasses.fields(MSPLoRAConfig):
        if f.name in own:
            continue
        core[f.name] = f.type
        kw = {"default": f.default} if f.default is not MISSING else {"default_factory": f.default_factory}
        setattr(cls, f.name, field(**kw, metadata={"help": f"as msplora.MSPLoRAConfig.{f.name}"}))
    cls.__annotations__ = {**core, **own}
    return dataclass(cls)


@_with_core_fields
class MSPLoRAPeftConfig(PeftConfig):
    """peft config of an MSPLoRA pyramid: every field of :class:`msplora.MSPLoRAConfig` (same
    names, meanings and defaults: ``levels``, ``ranks``, ``r0`` / ``decay``, ``dropout``,
    ``scale_rule``, ``lr_rule``, ``lr_ratio_B``, ``budget_of``, ...), plus peft's and LoRA's names:

    Args:
        targets: module names to adapt (``["query", "value"]``), one regex over the full name,
            ``"all-linear"`` (every ``nn.Linear`` / ``Conv1D`` inside the transformer blocks; not
            the head, ``lm_head`` or pooler), or None: peft's LoRA defaults for the architecture
            (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: q/v projections).
        target_modules: LoRA's name for ``targets``; give one of the two.
        r: LoRA's rank, mapped to the pyramid's top (coarsest) level rank: ``r0 = r``, finer
            levels follow ``decay`` (0.5: ``r=8`` gives the paper's 8 / 4 / 2).
        lora_alpha: LoRA's alpha, mapped to every level's ``alpha``.
        lora_dropout: LoRA's dropout, mapped to ``dropout`` (one mask for all levels).
        modules_to_save: extra modules trained in full and saved (task heads); peft adds the
            classifier of a ``SEQ_CLS`` model itself, as for its own LoRA.
        task_type: peft's task type (``SEQ_CLS``, ``CAUSAL_LM``, ...).

    ``r`` / ``lora_alpha`` / ``lora_dropout`` are folded in and cleared (as ``r0`` / ``decay``
    are), so a saved config holds one source of truth. Validation is the core's
    (``MSPLoRAConfig.__post_init__``): errors name the field and the fix.
    """

    targets: list[str] | str | None = field(
        default=None, metadata={"help": "module names, one regex, 'all-linear', or None: the architecture's q/v"}
    )
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "LoRA's name for targets"})
    r: int | None = field(default=None, metadata={"help": "LoRA's rank -> the top level's rank (r0)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA's alpha -> every level's alpha"})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA's dropout -> dropout"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._fold_lora_names()
        unresolved = self.targets is None or _is_all_linear(self.targets)
        # the one validation; a target list that needs the model is checked at injection
        core = self.to_msplora(targets=["(resolved on the model)"] if unresolved else None)
        if not unresolved:
            self.targets = core.targets
        self.levels, self.budget_of = core.levels, core.budget_of
        self.ranks = self.r0 = self.decay = None
        self.target_modules = self.targets

    def _fold_lora_names(self) -> None:
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None:
            if self.targets is not None and self.targets != self.target_modules:
                _fail(
                    "target_modules",
                    f"{self.target_modules!r} given with targets={self.targets!r}",
                    "give one of them (target_modules is LoRA's name for targets)",
                )
            self.targets = self.target_modules
        if isinstance(self.targets, str) and _is_all_linear(self.targets):
            self.targets = ALL_LINEAR
        if self.r is not None:
            if self.ranks is not None or self.r0 is not None:
                _fail("r", "given with ranks / r0", "give one: r is the top level's rank, as r0")
            self.r0 = self.r
        if self.lora_alpha is not None:
            self.levels = copy.deepcopy(self.levels)  # the caller's Level objects stay as they were
            for lv in self.levels:
                if isinstance(lv, dict):
                    lv["alpha"] = self.lora_alpha
                else:
                    lv.alpha = self.lora_alpha
        if self.lora_dropout is not None:
            default = next(f.default for f in dataclasses.fields(MSPLoRAConfig) if f.name == "dropout")
            if self.dropout not in (default, self.lora_dropout):
                _fail(
                    "lora_dropout",
                    f"{self.lora_dropout} given with dropout={self.dropout}",
                    "give one of them (lora_dropout is LoRA's name for dropout)",
                )
            self.dropout = self.lora_dropout
        self.r = self.lora_alpha = self.lora_dropout = None

    def to_msplora(self, modules_to_save: list[str] | None = None, targets: list[str] | str | None = None):
        """The core config: every :class:`MSPLoRAConfig` field copied (``modules_to_save`` and
        ``targets`` override the config's own, e.g. with targets resolved on a model)."""
        kw = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(MSPLoRAConfig)}
        if targets is not None:
            kw["targets"] = targets
        kw["modules_to_save"] = list(kw["modules_to_save"] or []) if modules_to_save is None else modules_to_save
        return MSPLoRAConfig(**kw)

    @classmethod
    def from_msplora(cls, config: MSPLoRAConfig, **peft_fields: Any) -> MSPLoRAPeftConfig:
        """The peft config of a core config; ``peft_fields`` sets e.g. ``task_type``."""
        core = {f.name: copy.deepcopy(getattr(config, f.name)) for f in dataclasses.fields(MSPLoRAConfig)}
        return cls(**core, **peft_fields)


def _is_all_linear(targets: Any) -> bool:
    return isinstance(targets, str) and targets.lower() == ALL_LINEAR


def _block_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear / Conv1D inside a transformer block: a child of an
    ``nn.ModuleList`` (``layer.N``, ``layers.N``, ``h.N``, ...). The head, ``lm_head`` and the
    pooler sit outside the blocks, so they are never included."""
    from transformers.pytorch_utils import Conv1D

    blocks = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    prefixes = tuple(f"{b}." if b else "" for b in blocks)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)) or ".base_layer" in name:
            continue
        for p in prefixes:
            rest = name[len(p) :] if name.startswith(p) else None
            if rest is not None and re.match(r"\d+\.", rest):
                out.append(name)
                break
    return out


def resolve_targets(model: nn.Module, config: MSPLoRAPeftConfig) -> list[str] | str:
    """The config's targets on ``model``: as given; ``"all-linear"`` as one regex naming every
    linear map inside the blocks; None as peft's LoRA defaults for ``model.config.model_type``."""
    if _is_all_linear(config.targets):
        names = _block_linear_names(model)
        if not names:
            _fail(
                "target_modules",
                f"'all-linear' finds no linear map inside numbered blocks of {type(model).__name__}",
                "name the targets",
            )
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    if config.targets is not None:
        return config.targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if default is None:
        _fail(
            "target_modules",
            f"no default targets for model type {model_type!r} ({type(model).__name__})",
            "set target_modules=[...] (its linear layers' names) or 'all-linear'",
        )
    return list(default) if not isinstance(default, str) else default
