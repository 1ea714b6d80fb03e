"""The way back to the core door: a PeftModel as the core's injected model."""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import (
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
)
from torch import nn

from msplora.inject import (
    get_bank,
)
from msplora.peft.config import PEFT_TYPE, _fail
from msplora.peft.layer import MSPLoRAPeftLayer


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
