"""Adapters that every LoRA tool loads: a ``peft`` LoRA folder, or a plain merged model.

    pyramid (bank: each shared A/B once)            peft LoRA, per wrapped layer l
    y = W x + sum_k s_k B_{k,c} A_{k,c} drop(x)  =  W x + B_l A_l drop(x)
                                                    A_l = [A_{1,c1}; A_{2,c2}; ...]      (R, d_in)
                                                    B_l = [s_1 B_{1,c1} | s_2 B_{2,c2} | ...]  (d_out, R)
                                                    R = sum_k r_k,  lora_alpha = R  (peft scale 1)

Dropout: the pyramid draws one mask on ``x`` shared by all levels, which is exactly what
peft's LoRA does with its one ``lora_dropout`` on the rank-R input; the export carries the
rate, so train-mode outputs match too (same mask from the same RNG state; tested).

The folder names the base model the way a user would (a hub name, or the alias's public
hub name), never a path inside a virtualenv or a cache, and carries peft's ``task_type``,
so ``AutoPeftModelFor*.from_pretrained(folder)`` finds and builds the base itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from msplora.config import ConfigError
from msplora.inject import get_bank, modules_to_save_of, wrapped_layers
from msplora.io import atomic_dir

__all__ = ["PUBLIC_NAMES", "export_peft", "lora_view", "public_model_name", "save_plain", "task_type_of"]

# Embedded aliases (msplora.hf.MODEL_ALIASES) -> the public hub model they were made from.
# smollm2 ships as a Q4_1 GGUF: its dequantised weights differ slightly from the hub's, so
# an adapter trained on the alias is close to, not exactly, an adapter for the hub model.
PUBLIC_NAMES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def _alias_dirs() -> dict[Path, str]:
    """Folders an alias resolves to on this machine -> the alias's public name."""
    from msplora.hf import MODEL_ALIASES, MissingModelPackageError, gguf_cache_dir

    out = {}
    for alias, public in PUBLIC_NAMES.items():
        try:
            where = MODEL_ALIASES[alias].locate()
        except (KeyError, MissingModelPackageError):
            continue
        out[(gguf_cache_dir(where) if MODEL_ALIASES[alias].gguf else where).resolve()] = public
    return out


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def public_model_name(name: str | None) -> str | None:
    """The base-model name to write into an exported folder: an alias becomes its public hub
    name; a hub name or a user's own folder stays; a folder inside a virtualenv or a cache
    (where a resolved alias or a download lives) is refused. No name (a model built from a
    config) stays None, as in peft: ``PeftModel.from_pretrained(base, folder)`` still loads
    it, ``AutoPeftModel`` needs ``base_model=``."""
    if not name:
        return None
    if name.lower() in PUBLIC_NAMES:
        return PUBLIC_NAMES[name.lower()]
    path = Path(name).expanduser()
    if not path.exists():
        return name  # a hub name
    resolved = path.resolve()
    public = _alias_dirs().get(resolved)
    if public is not None:
        return public
    from huggingface_hub.constants import HF_HUB_CACHE

    from msplora.hf import cache_root

    roots = [Path(p).resolve() for p in {sys.prefix, sys.base_prefix, str(cache_root()), HF_HUB_CACHE}]
    if _inside(resolved, roots):
        raise ConfigError(
            f"base_model: {name} is a folder inside a virtualenv or a cache, which no other machine has. "
            "Fix: pass base_model='<hub name>' (the model this folder was made from)"
        )
    return name


def task_type_of(model: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers model class (``SEQ_CLS``, ``CAUSAL_LM``, ...),
    from transformers' own auto-class tables; None for a class no table lists."""
    from transformers.models.auto import modeling_auto as auto

    tables = [
        ("SEQ_CLS", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        ("CAUSAL_LM", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("SEQ_2_SEQ_LM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("TOKEN_CLS", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        ("QUESTION_ANS", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
        ("FEATURE_EXTRACTION", auto.MODEL_MAPPING_NAMES),
    ]
    cls = type(model).__name__
    for task, table in tables:
        names = {n for v in table.values() for n in ((v,) if isinstance(v, str) else v)}
        if cls in names:
            return task
    return None


def _peft_classes():
    """peft's model and wrapper classes, or None where peft is not installed (then no model
    can hold peft wrappers)."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        return None
    return PeftModel, BaseTunerLayer, AuxiliaryTrainingWrapper, ModulesToSaveWrapper


def lora_view(
    model: nn.Module,
) -> tuple[nn.Module, list[tuple[str, nn.Module]], list[tuple[str, nn.Module]], str | None]:
    """What a LoRA folder needs from a model with an MSPLoRA adapter, from either door, read
    only: (the transformers model, [(module name as LoRA wraps it, core layer)], [(head name,
    trained head module)], peft task type or None).

    * ``msplora.inject`` / ``load_adapter``: the core layers and ``config.modules_to_save``.
    * a ``PeftModel`` of ``MSPLoRAPeftConfig`` (or the model inside it): names without peft's
      ``.base_layer`` level, the head as peft trains it (the active ``ModulesToSaveWrapper``
      copy), the task type of the peft config.

    Refuses (ConfigError, one line) what a LoRA folder would get wrong: another peft method,
    peft wrappers it cannot carry, an adapter merged into the base weights."""
    classes = _peft_classes()
    task = None
    if classes is not None and isinstance(model, classes[0]):
        cfg = model.active_peft_config
        kind = getattr(cfg.peft_type, "value", cfg.peft_type)  # PeftType member, or msplora's plain string
        if kind != "MSPLORA":
            raise ConfigError(
                f"model: holds a peft {kind} adapter, not an MSPLoRA one. "
                "Fix: save it with model.save_pretrained(dir), which is already a peft folder"
            )
        task = cfg.task_type
        model = model.get_base_model()
    bank = get_bank(model)
    modules = dict(model.named_modules())
    layers, heads = [], []
    for name, layer in wrapped_layers(model):
        parent, _, leaf = name.rpartition(".")
        if classes is not None and leaf == "base_layer" and isinstance(modules.get(parent), classes[1]):
            name = parent  # the peft door's view layer: LoRA wraps the module at its name
        layers.append((name, layer))
    if classes is not None:
        for name, mod in modules.items():
            if isinstance(mod, classes[3]):
                active = [a for a in mod.active_adapters if a in mod.modules_to_save]
                if active:
                    heads.append((name, mod.modules_to_save[active[0]]))
            elif isinstance(mod, classes[2]):
                raise ConfigError(
                    f"model: {name} is a peft {type(mod).__name__}, which a LoRA folder made here cannot carry. "
                    "Fix: export a model without it"
                )
    heads += modules_to_save_of(model, bank.config)
    merged = [f"{layer.kind} at layer {layer.layer_id}" for _, layer in layers if layer.merged]
    if merged:
        raise ConfigError(
            f"model: the adapter is merged into the base weights ({merged[0]}, ...), so a LoRA folder loaded on "
            "the base would add it twice. Fix: unmerge first (msplora.unmerge(model) / model.unmerge_adapter())"
        )
    return model, layers, heads, task or task_type_of(model)


@torch.no_grad()
def export_peft(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Write a ``peft`` LoRA adapter equal to this pyramid (see the module docstring), head included.

    Args:
        model: a model with an MSPLoRA adapter: ``msplora.inject`` / ``load_adapter``, or a
            ``PeftModel`` built with ``MSPLoRAPeftConfig`` (``get_peft_model``, a Trainer's
            model), or the transformers model inside it.
        path: the folder to write (replaced atomically: never half-written).
        base_model: name to record as ``base_model_name_or_path``; default: the model's
            ``name_or_path`` through :func:`public_model_name`.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    model, layers, heads, task = lora_view(model)
    cfg = get_bank(model).config
    fifo = {layer.fan_in_fan_out for _, layer in layers}
    if len(fifo) > 1:
        raise ConfigError(
            "targets: the adapter mixes Conv1D-style and nn.Linear-style targets; a peft LoRA folder has one "
            "fan_in_fan_out. Fix: export models whose targets share one weight layout"
        )
    name = public_model_name(base_model or getattr(getattr(model, "config", None), "name_or_path", None))
    r = cfg.total_rank
    lora = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=cfg.targets if isinstance(cfg.targets, str) else sorted(cfg.targets),
        lora_dropout=cfg.dropout,
        fan_in_fan_out=fifo.pop(),
        modules_to_save=sorted({h for h, _ in heads}) or None,
        bias="none",
        base_model_name_or_path=name,
        task_type=task,
    )
    state = {}
    for mname, layer in layers:
        kb = layer.bank
        a, b, scale = kb.gather(layer.rows)  # (R, d_in), (d_out, R), (R,)
        b = b * scale  # s_k folded in
        state[f"base_model.model.{mname}.lora_A.weight"] = a.float().cpu().contiguous()
        state[f"base_model.model.{mname}.lora_B.weight"] = b.float().cpu().contiguous()
    for mname, mod in heads:
        for pname, p in mod.named_parameters():
            state[f"base_model.model.{mname}.{pname}"] = p.detach().cpu().contiguous()

    with atomic_dir(path) as d:  # never a half-written export
        lora.save_pretrained(str(d))
        save_file(state, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def save_plain(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Save a plain transformers model (no adapter left: call ``merge_and_unload`` first)
    and its tokenizer as a folder that ``from_pretrained`` loads; atomic, readable by others."""
    if get_bank(model, required=False) is not None:
        raise ConfigError(
            "model: still carries an MSPLoRA adapter. Fix: plain = msplora.merge_and_unload(model), then save plain"
        )

    with atomic_dir(path) as d:
        model.save_pretrained(str(d))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))
    return Path(path)
