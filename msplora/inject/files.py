"""Adapter files: safetensors weights (each shared tensor once) + a JSON config and layout;
saved atomically, read back only into a model they fit (refused before anything changes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.inject.adapted import get_bank, modules_to_save_of, wrapped_layers
from msplora.inject.injection import inject
from msplora.inject.targets import _build_bank, _plan, target_layout
from msplora.io import atomic_dir, read_json
from msplora.layers import MSPLoRABank
from msplora.quant import warn_requantized

ADAPTER_CONFIG = "adapter_config.json"

ADAPTER_WEIGHTS = "adapter_model.safetensors"

FORMAT_VERSION = 1


def _layout(model: nn.Module) -> dict[str, dict]:
    return {
        kind: {"d_in": kb.d_in, "d_out": kb.d_out, "layers": kb.layer_ids} for kind, kb in get_bank(model).kinds.items()
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each shared tensor once: ``<level>.<kind>.A`` (cells, r, d_in), ``.B`` (cells, d_out, r),
    plus ``modules_to_save.<module>.<param>`` for trained heads."""
    bank = get_bank(model)
    return {k: v.detach().contiguous().clone() for k, v in _adapter_tensors(model, bank).items()}


def _adapter_tensors(model: nn.Module, bank: MSPLoRABank) -> dict[str, torch.Tensor]:
    """The adapter file's tensors as views (bank may be a meta bank not attached to model)."""
    state = {}
    for kind, kb in bank.kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)
            state[f"{lv.name}.{kind}.A"] = a
            state[f"{lv.name}.{kind}.B"] = b
    for name, mod in modules_to_save_of(model, bank.config):
        for pname, p in mod.named_parameters():
            state[f"modules_to_save.{name}.{pname}"] = p
    return state


def _atomic_dir(path: Path, write) -> None:
    """Write into a temp dir beside ``path``, then swap it in: never a half-written adapter."""
    with atomic_dir(path) as tmp:
        write(tmp)


def save_adapter(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Save the adapter (safetensors + JSON config) to the directory ``path``."""
    from safetensors.torch import save_file

    if hasattr(model, "peft_config") and hasattr(model, "base_model"):  # a PeftModel (peft not imported)
        # peft keeps the trained head in its own modules_to_save wrapper, which the bank does not
        # know: saved this way the head would be silently missing.
        raise ConfigError(
            "save_adapter: this is a peft model; its head lives in peft's wrappers and would be left out. "
            "Fix: model.save_pretrained(dir), msplora.export_peft(model, dir) for plain LoRA, or "
            "save_adapter(msplora.peft.to_core_model(model), dir)"
        )
    bank = get_bank(model)
    info = {
        "format": "msplora",
        "version": FORMAT_VERSION,
        "base_model": getattr(getattr(model, "config", None), "name_or_path", None),
        "config": bank.config.to_dict(),
        "layout": _layout(model),
        **(metadata or {}),
    }
    state = {k: v.cpu() for k, v in adapter_state_dict(model).items()}

    def write(d: Path) -> None:
        save_file(state, str(d / ADAPTER_WEIGHTS))
        (d / ADAPTER_CONFIG).write_text(json.dumps(info, indent=2))

    _atomic_dir(Path(path), write)
    return Path(path)


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's JSON, checked: format, a valid ``config`` and a ``layout``. A file that
    is not that raises :class:`ConfigError` (missing files: ``FileNotFoundError``)."""
    path = Path(path)
    cfg = path / ADAPTER_CONFIG
    if not cfg.is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{path}: not an MSPLoRA adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}). "
            "Fix: pass the directory written by msplora.save_adapter"
        )
    fix = "Fix: restore the file, or save the adapter again with msplora.save_adapter"
    info = read_json(cfg, "adapter config", fix=fix.removeprefix("Fix: "))
    if not isinstance(info, dict) or info.get("format") != "msplora":
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{cfg}: not an MSPLoRA adapter config (format={got!r}). {fix}")
    if not isinstance(info.get("config"), dict) or not isinstance(info.get("layout"), dict):
        raise ConfigError(f"{cfg}: has no 'config' and 'layout' objects. {fix}")
    try:
        MSPLoRAConfig.from_dict(info["config"])
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cfg}: its config is invalid: {e}" + ("" if "Fix:" in str(e) else f". {fix}")) from None
    return info


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / ADAPTER_WEIGHTS
    try:
        return load_file(str(f))  # safetensors: never unpickles
    except (SafetensorError, OSError) as e:
        raise ConfigError(
            f"{f}: cannot read the adapter weights as safetensors ({e}). "
            "Fix: restore the file, or save the adapter again with msplora.save_adapter"
        ) from None


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter into ``model`` (injecting it first if needed). Refuses, before
    changing anything, an adapter that does not fit or a file that cannot be read: after a
    refusal the model is as it was. Layers that were merged stay merged, with the loaded
    adapter's delta (the old delta is taken out first, so ``unmerge`` gives back the base)."""
    path = Path(path)
    info = read_adapter_config(path)
    config = MSPLoRAConfig.from_dict(info["config"])
    bank = get_bank(model, required=False)
    if bank is not None and bank.config.to_dict() != config.to_dict():
        raise ConfigError(
            f"{path}: adapter config differs from the model's adapter config. "
            "Fix: load into a model without an adapter, or one injected with the same config"
        )
    layout = target_layout(model, config) if bank is None else _layout(model)
    if layout != info["layout"]:
        raise ConfigError(
            f"{path}: adapter does not fit this model: saved layout {info['layout']} vs model {layout}. "
            "Fix: load it into the base model it was trained on"
        )
    state = _read_weights(path)
    # What the file must hold, from a meta bank when the model has none yet: checked
    # before injecting, so a refusal has nothing to undo.
    expected = _adapter_tensors(model, bank if bank is not None else _build_bank(_plan(model, config), config, "meta"))
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise ConfigError(
            f"{path}: tensors do not fit (missing {missing}, unexpected {unexpected}, wrong shape {bad_shape}). "
            "Fix: load the adapter into the model and config it was saved from"
        )
    # Every check passed; from here on the model changes.
    if bank is None:
        inject(model, config)
    merged = [layer for _, layer in wrapped_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()  # with the old A/B, which are about to be overwritten
    _copy_in(model, state)
    for layer in merged:
        layer.merge()
    # a quantized base merged again with the new delta was rounded again: say so, as merge does
    warn_requantized([(f"{x.kind} layer {x.layer_id}", x.merge_error) for x in merged if x.quantized])
    return model


def _copy_in(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    bank = get_bank(model)
    for kind, kb in bank.kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # views into A and B
            a.copy_(state[f"{lv.name}.{kind}.A"])
            b.copy_(state[f"{lv.name}.{kind}.B"])
    for name, mod in modules_to_save_of(model, bank.config):
        for pname, p in mod.named_parameters():
            p.data.copy_(state[f"modules_to_save.{name}.{pname}"])
