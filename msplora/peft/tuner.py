"""The peft tuner: injection through the core, and the state-dict hooks that save each shared tensor once."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    set_additional_trainable_modules,
)
from torch import nn

from msplora.config import ConfigError
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
from msplora.layers import MSPLoRABank
from msplora.peft.config import KEY_NS, resolve_targets
from msplora.peft.layer import MSPLoRAPeftLayer


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
