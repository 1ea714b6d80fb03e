"""MSPLoRA as a native ``peft`` method: ``import msplora.peft`` registers it.

    get_peft_model(model, MSPLoRAPeftConfig(target_modules=[...]))  msplora.inject(model, MSPLoRAConfig(...))
                    |                                                           |
        MSPLoRAPeftModel (peft BaseTuner)                                       |
          inject_adapter --------------------------------------------> msplora.inject (the core)
                    |                                                           |
        MSPLoRAPeftLayer (peft BaseTunerLayer)  --base_layer-->  MSPLoRALinear --base_layer--> nn.Linear / Conv1D
                                                                       |  (forward, merge: the core's)
                                                      model.msplora_bank (each shared A/B once)

Two doors, one implementation: the peft layer is a thin view that peft's machinery can
see (enable/disable, merge, status); the forward, the merge (and its safe check) and the
adapter file layout are the core's (``MSPLoRALinear``, ``adapter_state_dict``). peft's
``save_pretrained`` writes the core's tensors (each shared tensor once) under the
``msplora.`` namespace, beside peft's own ``modules_to_save`` keys for task heads.

Ways out: ``msplora.export_peft(peft_model, dir)`` writes a plain peft LoRA folder (head
included); :func:`to_core_model` turns the PeftModel into the core's injected model (then
``msplora.save_adapter`` / ``merge_and_unload`` apply); ``msplora export SRC --to ...``
takes a ``save_pretrained`` folder or a Trainer ``checkpoint-N/`` folder.

The config takes LoRA's names: ``target_modules`` (= ``targets``), ``"all-linear"``, no
targets (peft's per-architecture defaults, ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``),
and ``r`` / ``lora_alpha`` / ``lora_dropout``, mapped onto the pyramid (see the config).

What of peft this module touches beyond its documented user API, and why (peft's minor is
pinned in pyproject.toml because of them):

* Registration. ``register_peft_method`` only accepts names that are already ``PeftType``
  members. peft accepts a plain string ``peft_type`` (0.17+): every lookup is a dict lookup
  in the ``PEFT_TYPE_TO_*`` mappings, which ``PeftType``'s str values hash like. So the
  method is registered by writing ``"MSPLORA"`` into the three public mappings
  (``PEFT_TYPE_TO_CONFIG_MAPPING``, ``PEFT_TYPE_TO_TUNER_MAPPING``,
  ``peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING``), which is what ``register_peft_method``
  does after its enum check. The ``PeftType`` enum is not touched.
* Tuner hooks. ``BaseTuner._get_adapter_state_dict``, ``_remove_adapter_name_from_key`` and
  ``_remap_adapter_state_dict_for_load`` (underscore names): peft's save / load call them,
  and they are the extension points peft's own shared-tensor tuners (VeRA, VB-LoRA) use;
  a bank that owns each tensor once cannot be saved or loaded without them.
* ``BaseTuner._create_and_replace`` is abstract in peft and must be defined; injection is
  whole-model here (``inject_adapter``), so it refuses.
* ``BaseTunerLayer._all_available_adapter_names`` / ``_get_available_adapters``: peft's
  walks ask every tuner layer for them; this layer has no per-layer adapter dicts to
  inspect, so it answers itself.

peft's private attributes ``_active_adapter`` / ``_disable_adapters`` are not written: the
layer overrides the public ``active_adapter`` / ``disable_adapters`` properties and keeps
its state in the core layer (one source of truth). The core is used through public names
only (``inject``, ``adapter_state_dict``, ``KindBank.level_block``, ``merged_weight``).

One adapter per model: the bank is per model, so ``add_adapter`` / ``load_adapter`` of a
second MSPLoRA adapter raise a :class:`msplora.ConfigError` that says so (peft rolls the
failed addition back); two pyramids are never mixed.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import MISSING, dataclass, field
from typing import Any

import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    set_additional_trainable_modules,
)
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.inject import (
    PREFIX as BANK_ATTR,
)
from msplora.inject import (
    adapter_state_dict,
    get_bank,
    inject,
    merge,
    release_save_guard,
    unmerge,
    wrapped_layers,
)
from msplora.layers import MSPLoRABank, MSPLoRALinear

__all__ = [
    "ALL_LINEAR",
    "PEFT_TYPE",
    "MSPLoRAPeftConfig",
    "MSPLoRAPeftLayer",
    "MSPLoRAPeftModel",
    "resolve_targets",
    "to_core_model",
]

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


# -- tuner ----------------------------------------------------------------------------------
def _bank_owner(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the module that holds the bank (the transformers model)."""
    for name, mod in model.named_modules():
        if isinstance(mod, MSPLoRABank):
            owner = name.rpartition(".")[0]
            return owner, model.get_submodule(owner) if owner else model
    raise ConfigError("model: has no MSPLoRA adapter. Fix: build it with get_peft_model(model, MSPLoRAPeftConfig(...))")


class MSPLoRAPeftModel(BaseTuner):
    """peft tuner for MSPLoRA: injection, merging, state dict and unloading go through the core."""

    prefix: str = "msplora_"
    tuner_layer_cls = MSPLoRAPeftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # LoRA's defaults (resolve_targets)
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
        targets = resolve_targets(model, config)
        # Heads go through peft's own ModulesToSaveWrapper (set below), as for peft's LoRA.
        inject(model, config.to_msplora(modules_to_save=[], targets=targets))
        if config.targets is None:  # as peft's LoRA: the saved config names the defaults it used
            config.targets = config.target_modules = targets
        names = []
        for name, core in list(wrapped_layers(model)):
            model.set_submodule(name, MSPLoRAPeftLayer(core, adapter_name))
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

    def _layers(self, adapter_names: list[str] | None) -> list[MSPLoRAPeftLayer]:
        layers = [m for m in self.model.modules() if isinstance(m, MSPLoRAPeftLayer)]
        for layer in layers:
            layer._check_names(adapter_names)
        return layers

    # -- merging: the core's merge, whose safe check runs on every layer before any merges --
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._layers(adapter_names)
        merge(self.model, safe=safe_merge)

    # -- unloading: peft's walk replaces each layer by get_base_layer(); the bank goes after --
    def _finish_unload(self) -> nn.Module:
        if get_bank(self.model, required=False) is not None:
            delattr(self.model, BANK_ATTR)
        release_save_guard(self.model)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge every delta into its base weight and return the plain transformers model.
        ``safe_merge``: the core's check (every layer first; a refusal merges nothing)."""
        self._layers(adapter_names)
        merge(self.model, safe=safe_merge)
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
        """Checkpoint (the core's per-level tensors, ``adapter_state_dict``'s keys) -> the bank's
        parameters, written through the bank's own level views (``KindBank.level_block``) so the
        layout has one implementation. The model is left unchanged here (peft's
        ``load_state_dict`` that follows writes the result)."""
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
        bank_key = f"{owner_name}.{BANK_ATTR}" if owner_name else BANK_ATTR
        with torch.no_grad():
            for kind, kb in get_bank(owner).kinds.items():
                live = kb.A.detach().clone(), kb.B.detach().clone()
                for k, lv in enumerate(kb.levels):
                    a, b = kb.level_block(k)  # views into A and B
                    a.copy_(ours[f"{lv.name}.{kind}.A"])
                    b.copy_(ours[f"{lv.name}.{kind}.B"])
                rest[f"{bank_key}.kinds.{kind}.A"] = kb.A.detach().clone()
                rest[f"{bank_key}.kinds.{kind}.B"] = kb.B.detach().clone()
                kb.A.copy_(live[0])
                kb.B.copy_(live[1])
        return rest


# -- the way back to the core door ------------------------------------------------------------
def to_core_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or that model itself), turned in place into
    what ``msplora.inject`` builds: each peft layer view replaced by its core layer, each
    trained head copy (peft's ``ModulesToSaveWrapper``) put where its wrapper was and listed in
    the adapter config's ``modules_to_save``. Then ``msplora.save_adapter``, ``export_peft``
    and ``merge_and_unload`` see the adapter and the head. Refuses (changing nothing) a model
    without an MSPLoRA adapter or with peft wrappers it cannot convert; the PeftModel itself
    must not be used afterwards."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    kind = (
        getattr(model.active_peft_config.peft_type, "value", PEFT_TYPE) if isinstance(model, PeftModel) else PEFT_TYPE
    )
    if kind != PEFT_TYPE:
        _fail(
            "model",
            f"holds a peft {kind} adapter, not an MSPLoRA one",
            "save it with model.save_pretrained(dir)",
        )
    bank = get_bank(base)
    swaps, heads = [], []
    for name, mod in base.named_modules():
        if isinstance(mod, MSPLoRAPeftLayer):
            swaps.append((name, mod.core))
        elif isinstance(mod, ModulesToSaveWrapper):
            active = [a for a in mod.active_adapters if a in mod.modules_to_save]
            swaps.append((name, mod.modules_to_save[active[0]] if active else mod.original_module))
            heads += [name] if active else []
        elif isinstance(mod, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            _fail("model", f"{name} is a peft {type(mod).__name__}, which msplora cannot convert", "remove it first")
    for name, new in swaps:  # every check passed: from here on the model changes
        base.set_submodule(name, new)
    bank.config.modules_to_save = heads
    base.__dict__.pop("peft_config", None)  # left by peft's BaseTuner
    return base


if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:  # once per process, even if this module is reloaded
    # What register_peft_method does after its PeftType check (see the module docstring).
    if MSPLoRAPeftModel.prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"peft already has a method with the prefix {MSPLoRAPeftModel.prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MSPLoRAPeftConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MSPLoRAPeftModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MSPLoRAPeftModel.prefix
