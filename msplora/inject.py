"""Injection into any Hugging Face model with numbered blocks, and what follows from it:
merge / unmerge, adapter save / load, export to ``peft``, parameter reports.

Module names are parsed as ``<stack>.<N>.<path inside the block>``, where the stack ends
in ``layer``, ``layers``, ``h``, ``block`` or ``blocks`` (BERT/RoBERTa, LLaMA, GPT-2, T5, ...).
Target kind = the module's last name (``query``), or its path inside the block where
two targets of one block share a last name; models with several stacks (encoder and
decoder) get one kind per stack.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.io import atomic_dir, read_json
from msplora.layers import PREFIX, KindBank, MSPLoRABank, MSPLoRALinear
from msplora.quant import is_quantized, keep_trainable_layout, warn_requantized
from msplora.quant import shape as quantized_shape

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_VERSION = 1
_BLOCK = re.compile(r"^(?P<stack>(?:.*\.)?(?:layer|layers|h|block|blocks))\.(?P<idx>\d+)\.(?P<rel>.+)$")


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


@dataclass
class Target:
    name: str  # qualified module name
    module: nn.Module
    layer_id: int
    kind: str
    fan_in_fan_out: bool

    @property
    def shape(self) -> tuple[int, int]:  # (d_in, d_out)
        if is_quantized(self.module):  # a packed 4-bit weight's shape is not (d_out, d_in)
            return quantized_shape(self.module)
        w = self.module.weight
        return (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])


def _matches(config: MSPLoRAConfig, name: str) -> bool:
    if isinstance(config.targets, str):
        return re.fullmatch(config.targets, name) is not None
    return name.rsplit(".", 1)[-1] in config.targets


def find_targets(model: nn.Module, config: MSPLoRAConfig) -> list[Target]:
    """The modules to wrap, with their layer index and kind; errors name what exists."""
    conv1d = _conv1d_type()
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, MSPLoRALinear) or ".base_layer" in name or name.startswith(PREFIX):
            continue
        if not _matches(config, name):
            continue
        if not isinstance(mod, (nn.Linear, conv1d)):
            raise ConfigError(
                f"targets: {name} matches but is a {type(mod).__name__}, not a linear map. "
                "Fix: target nn.Linear / Conv1D modules only"
            )
        m = _BLOCK.match(name)
        if m is None:
            raise ConfigError(
                f"targets: {name} has no layer index (no layer.N / layers.N / h.N / blocks.N in its name), "
                "so it cannot be placed in the pyramid. Fix: narrow targets to modules inside numbered blocks"
            )
        fifo = isinstance(mod, conv1d) if config.fan_in_fan_out is None else config.fan_in_fan_out
        found.append((name, mod, m["stack"], int(m["idx"]), m["rel"], fifo))
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, conv1d))})
        raise ConfigError(
            f"targets: {config.targets!r} matches no module of {type(model).__name__}. "
            f"Fix: use some of its linear layers: {linear}"
        )
    last_names = [(stack, idx, rel.rsplit(".", 1)[-1]) for _, _, stack, idx, rel, _ in found]
    by_rel = len(set(last_names)) < len(last_names)  # two targets in a block share a last name
    stacks = sorted({f[2] for f in found})
    targets = []
    for name, mod, stack, idx, rel, fifo in found:
        kind = (rel if by_rel else rel.rsplit(".", 1)[-1]).replace(".", "_")
        if len(stacks) > 1:
            kind = f"{stack.replace('.', '_')}__{kind}"
        targets.append(Target(name, mod, idx, kind, fifo))
    return targets


def _bank_dtype(weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 beside a half-precision base (as peft does); fp64 stays fp64.
    return (
        torch.float32
        if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point()
        else weight.dtype
    )


def _plan(model: nn.Module, config: MSPLoRAConfig) -> dict[str, list[Target]]:
    by_kind: dict[str, list[Target]] = defaultdict(list)
    for t in find_targets(model, config):
        by_kind[t.kind].append(t)
    for kind, ts in by_kind.items():
        ts.sort(key=lambda t: t.layer_id)
        shapes = {t.shape for t in ts}
        if len(shapes) > 1:
            raise ConfigError(
                f"targets: kind {kind} has different shapes across layers {sorted(shapes)}; "
                "cells cannot be shared. Fix: target modules of one shape per kind"
            )
        n = len(ts)
        for i, lv in enumerate(config.levels):
            if lv.groups is not None and lv.groups > n:
                raise ConfigError(
                    f"levels[{i}].groups: {lv.groups} groups for {n} adapted layers of {kind}. Fix: use groups <= {n}"
                )
            if lv.group_size is not None and lv.group_size > n:
                raise ConfigError(
                    f"levels[{i}].group_size: {lv.group_size} > {n} adapted layers of {kind}. "
                    f"Fix: use group_size <= {n}, or a global level"
                )
    return dict(by_kind)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _build_bank(plan: dict[str, list[Target]], config: MSPLoRAConfig, device=None) -> MSPLoRABank:
    """The bank `inject` would attach (on ``device``, default: beside each kind's weights).
    ``device="meta"`` gives its tensor names and shapes without allocating anything."""
    kinds = {}
    for kind, ts in plan.items():
        w = ts[0].module.weight
        d_in, d_out = ts[0].shape
        kinds[kind] = KindBank(
            config.levels,
            [t.layer_id for t in ts],
            d_in,
            d_out,
            config.init,
            w.device if device is None else device,
            _bank_dtype(w),
        )
    return MSPLoRABank(config, kinds)


def inject(model: nn.Module, config: MSPLoRAConfig) -> nn.Module:
    """Wrap the targets of ``model`` in place, freeze everything but the adapter (and
    ``modules_to_save``), and return the model. Works on the ``meta`` device (then
    materialise with ``model.to_empty(device=...)`` and :func:`reset_adapter`).

    All or nothing: every check runs before the model is touched, and should swapping
    fail half-way the model gets back its modules and ``requires_grad`` flags."""
    if get_bank(model, required=False) is not None:
        raise ConfigError(
            "model: already has an MSPLoRA adapter. Fix: inject into a fresh model, or merge_and_unload first"
        )
    plan = _plan(model, config)
    # budget_of -> ranks for this model (a resolved copy; the bank keeps it, saves it)
    config = config.resolve_budget({kind: (len(ts), *ts[0].shape) for kind, ts in plan.items()})
    save_modules = _modules_to_save(model, config)
    bank = _build_bank(plan, config)
    bank.train(model.training)
    was_trainable = {p: p.requires_grad for p in model.parameters()}  # Parameter hashes by identity
    swapped: list[Target] = []
    try:
        for p in was_trainable:
            p.requires_grad_(False)
        for kind, ts in plan.items():
            for pos, t in enumerate(ts):
                wrapper = MSPLoRALinear(t.module, bank.kinds[kind], kind, pos, config.dropout, t.fan_in_fan_out)
                # A new module starts in train mode; injecting into an eval model must not
                # switch its adapter dropout on. Follow the module it replaces.
                wrapper.train(t.module.training)
                _set_module(model, t.name, wrapper)
                swapped.append(t)
        setattr(model, PREFIX, bank)
        for _, mod in save_modules:
            mod.requires_grad_(True)
    except BaseException:
        for t in swapped:
            _set_module(model, t.name, t.module)
        if getattr(model, PREFIX, None) is bank:
            delattr(model, PREFIX)
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
        raise
    keep_trainable_layout(model)  # bnb 4-bit bases: see msplora.quant
    _guard_save_pretrained(model)
    return model


@torch.no_grad()
def reset_adapter(model: nn.Module) -> nn.Module:
    """Re-initialise every A (as at injection: ``config.init``) and zero every B, and rebuild
    the wrappers' row indices and scales. Materialises an adapter injected on ``meta``
    after ``model.to_empty(device=...)``, which leaves uninitialised memory in A, B and in
    the wrappers' buffers. The base weights are not touched (load them as usual)."""
    bank = get_bank(model)
    unmerge(model)  # a merged delta must leave W before its A/B are replaced
    for kb in bank.kinds.values():
        kb.reset_parameters(bank.config.init)
        kb.row_scale.copy_(torch.tensor(kb.scales()))
    for _, layer in wrapped_layers(model):
        layer.rows.copy_(torch.tensor(layer.bank.rows(layer.pos)))
    return model


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


def _modules_to_save(model: nn.Module, config: MSPLoRAConfig) -> list[tuple[str, nn.Module]]:
    out = []
    for want in config.modules_to_save:
        hits = [(n, m) for n, m in model.named_modules() if n == want or n.endswith("." + want)]
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ConfigError(f"modules_to_save: {want!r} names no module. Fix: use a module name such as {top}")
        out.extend(hits)
    return out


# -- access ---------------------------------------------------------------------------------
def get_bank(model: nn.Module, required: bool = True) -> MSPLoRABank | None:
    bank = getattr(model, PREFIX, None)
    if bank is None and required:
        raise ConfigError("model: has no MSPLoRA adapter. Fix: call msplora.inject(model, config) first")
    return bank


def wrapped_layers(model: nn.Module) -> Iterator[tuple[str, MSPLoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, MSPLoRALinear):
            yield name, mod


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameters; each shared tensor counts once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> int:
    """Number of adapter (A/B) parameters only, without task heads."""
    return sum(p.numel() for p in get_bank(model).parameters())


def parameter_report(model: nn.Module) -> list[dict]:
    """One row per (level, kind): share, rank, cells, shape and parameter count."""
    rows = []
    for kind, kb in get_bank(model).kinds.items():
        for k, lv in enumerate(kb.levels):
            rows.append(
                dict(
                    level=lv.name,
                    share=lv.share,
                    kind=kind,
                    rank=lv.rank,
                    cells=kb.n_cells[k],
                    d_in=kb.d_in,
                    d_out=kb.d_out,
                    params=lv.rank * kb.n_cells[k] * (kb.d_in + kb.d_out),
                )
            )
    return rows


def format_report(model: nn.Module) -> str:
    """The parameter report as a markdown table, with totals per level."""
    rows = parameter_report(model)
    lines = ["| level | share | kind | rank | cells | d_in x d_out | params |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['level']} | {r['share']} | {r['kind']} | {r['rank']} | {r['cells']} | {r['d_in']}x{r['d_out']} | {r['params']:,} |"
        for r in rows
    ]
    per_level: dict[str, int] = defaultdict(int)
    for r in rows:
        per_level[r["level"]] += r["params"]
    lines += [f"| **{lv}** | | all | | | | {n:,} |" for lv, n in per_level.items()]
    lines.append(f"| **adapter total** | | | | | | {sum(per_level.values()):,} |")
    lines.append(f"| **trainable total** | | | | | | {trainable_parameters(model):,} |")
    return "\n".join(lines)


# -- merge ----------------------------------------------------------------------------------
def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Add every delta into its base weight (idempotent). ``safe`` first checks every layer
    and refuses, merging none, if any merged weight would be non-finite."""
    layers = [layer for _, layer in wrapped_layers(model) if not layer.merged]
    if safe:
        # One layer at a time (not all merged weights held at once): computing each merged
        # weight twice is cheaper than holding a second copy of every target weight.
        bad = [
            f"{layer.kind} at layer {layer.layer_id}" for layer in layers if not layer.merged_weight().isfinite().all()
        ]
        if bad:
            raise ConfigError(
                f"merge: the delta of {', '.join(bad)} gives non-finite weights; nothing was merged. "
                "Fix: look for inf/NaN in the adapter (a diverged run?) before merging"
            )
    for layer in layers:
        layer.merge()
    warn_requantized([(f"{x.kind} layer {x.layer_id}", x.merge_error) for x in layers if x.quantized])
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract merged deltas again (idempotent)."""
    for _, layer in wrapped_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge, then put the plain base modules back: a model that costs exactly the base.
    With ``safe``, a refused merge leaves the model as it was (see :func:`merge`)."""
    get_bank(model)  # refuse a model without an adapter before touching it
    merge(model, safe=safe)
    for name, layer in list(wrapped_layers(model)):
        _set_module(model, name, layer.base_layer)
    delattr(model, PREFIX)
    release_save_guard(model)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base output (merged deltas are taken out).

    On exit, also when the block raises, every layer is as before: flags restored (nesting
    works), and a merged weight is put back bit for bit from a copy, since unmerge + merge
    rounds twice and would drift (visibly in bf16) each time the block runs. That copy
    costs the merged target weights' memory for the block's duration."""
    layers = [layer for _, layer in wrapped_layers(model)]
    before = [(layer.disabled, layer.merged_snapshot() if layer.merged else None) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        with torch.no_grad():
            for layer, (disabled, merged_w) in zip(layers, before):
                layer.disabled = disabled
                if merged_w is not None:
                    layer.restore_merged(merged_w)


# -- updates, for analysis ------------------------------------------------------------------
@torch.no_grad()
def level_updates(model: nn.Module) -> dict[tuple[str, str, int], torch.Tensor]:
    """(level name, kind, cell) -> s_k B A, shape (d_out, d_in)."""
    out = {}
    for kind, kb in get_bank(model).kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # (n, r, d_in), (n, d_out, r)
            for c in range(kb.n_cells[k]):
                out[(lv.name, kind, c)] = lv.scale * b[c].float() @ a[c].float()
    return out


@torch.no_grad()
def layer_updates(model: nn.Module) -> dict[tuple[str, int], torch.Tensor]:
    """(kind, layer index) -> the layer's whole delta sum_k s_k B A, shape (d_out, d_in)."""
    out = {}
    for _, layer in wrapped_layers(model):
        d = layer.delta_weight().float()
        out[(layer.kind, layer.layer_id)] = d.T if layer.fan_in_fan_out else d
    return out


# -- save / load ----------------------------------------------------------------------------
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
    for name, mod in _modules_to_save(model, bank.config):
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
    return model


def target_layout(model: nn.Module, config: MSPLoRAConfig) -> dict[str, dict]:
    """What `inject` would build, without building it: kind -> {d_in, d_out, layers}."""
    plan = _plan(model, config)
    return {
        kind: {"d_in": ts[0].shape[0], "d_out": ts[0].shape[1], "layers": [t.layer_id for t in ts]}
        for kind, ts in plan.items()
    }


def _copy_in(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    bank = get_bank(model)
    for kind, kb in bank.kinds.items():
        for k, lv in enumerate(kb.levels):
            a, b = kb.level_block(k)  # views into A and B
            a.copy_(state[f"{lv.name}.{kind}.A"])
            b.copy_(state[f"{lv.name}.{kind}.B"])
    for name, mod in _modules_to_save(model, bank.config):
        for pname, p in mod.named_parameters():
            p.data.copy_(state[f"modules_to_save.{name}.{pname}"])
