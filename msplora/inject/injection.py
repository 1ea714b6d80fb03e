"""``inject``: wrap the targets in place, all or nothing; ``reset_adapter``: initialise again."""

from __future__ import annotations

import torch
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.inject.adapted import _guard_save_pretrained, _set_module, get_bank, modules_to_save_of, wrapped_layers
from msplora.inject.merging import unmerge
from msplora.inject.targets import Target, _build_bank, _plan
from msplora.layers import PREFIX, MSPLoRALinear
from msplora.quant import keep_trainable_layout


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
    save_modules = modules_to_save_of(model, config)
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
