"""Merge the adapter into the base weights and back, unload it, or switch it off for a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from msplora.config import ConfigError
from msplora.inject.adapted import _set_module, get_bank, release_save_guard, wrapped_layers
from msplora.layers import PREFIX
from msplora.quant import warn_requantized


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
