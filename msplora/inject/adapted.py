"""What an adapted model carries and how to reach it: its bank, its wrapped layers, the
trained heads (``modules_to_save``), and the guard on ``save_pretrained``."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.layers import PREFIX, MSPLoRABank, MSPLoRALinear


def get_bank(model: nn.Module, required: bool = True) -> MSPLoRABank | None:
    bank = getattr(model, PREFIX, None)
    if bank is None and required:
        raise ConfigError("model: has no MSPLoRA adapter. Fix: call msplora.inject(model, config) first")
    return bank


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, MSPLoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, MSPLoRALinear):
            yield name, mod


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def modules_to_save_of(model: nn.Module, config: MSPLoRAConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module ``config.modules_to_save`` names in ``model`` (trained whole)."""
    out = []
    for want in config.modules_to_save:
        hits = [(n, m) for n, m in model.named_modules() if n == want or n.endswith("." + want)]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ConfigError(f"modules_to_save: {want!r} names no module. Fix: use a module name such as {top}")
        out.extend(hits)
    return out


class _SavePretrainedRefusal:
    """Stands in for ``save_pretrained`` on an adapted model. A plain object, not a bound
    method, so copies and pickles of the model (deepcopy, torch.save, DDP spawn) keep it."""

    def __call__(self, *args, **kwargs):
        raise ConfigError(
            "save_pretrained: this model carries an MSPLoRA adapter; its state dict holds wrapped keys "
            "(...base_layer.weight, msplora_bank.*) that a plain from_pretrained would drop and re-initialise. "
            "Fix: save the adapter with msplora.save_adapter(model, dir) (or export_peft), or save a plain model "
            "with msplora.merge_and_unload(model).save_pretrained(dir)"
        )


def _guard_save_pretrained(model: nn.Module) -> None:
    """Shadow ``save_pretrained`` (and so ``push_to_hub``) on this instance with a refusal:
    transformers would write a folder that reloads silently wrong."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = _SavePretrainedRefusal()


def release_save_guard(model: nn.Module) -> None:
    """Give a model whose adapter is gone its own ``save_pretrained`` back."""
    model.__dict__.pop("save_pretrained", None)
