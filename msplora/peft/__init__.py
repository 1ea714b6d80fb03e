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

from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

from msplora.peft.config import ALL_LINEAR, KEY_NS, METHOD, PEFT_TYPE, MSPLoRAPeftConfig, resolve_targets
from msplora.peft.convert import to_core_model
from msplora.peft.layer import MSPLoRAPeftLayer
from msplora.peft.tuner import MSPLoRAPeftModel

__all__ = [
    "ALL_LINEAR",
    "KEY_NS",
    "METHOD",
    "PEFT_TYPE",
    "MSPLoRAPeftConfig",
    "MSPLoRAPeftLayer",
    "MSPLoRAPeftModel",
    "resolve_targets",
    "to_core_model",
]

if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:  # once per process, even if this module is reloaded
    # What register_peft_method does after its PeftType check (see the module docstring).
    if MSPLoRAPeftModel.prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"peft already has a method with the prefix {MSPLoRAPeftModel.prefix!r}")
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = MSPLoRAPeftConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = MSPLoRAPeftModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = MSPLoRAPeftModel.prefix
