"""The adapter's optimizer: parameter groups with per-level learning rates and LoRA+'s B/A ratio.

    group (lr, weight decay)                       holds
    (lr,             wd)   (lr, 0.0)               every A; heads' matrices / biases (head_lr None)
    (lr * lr_ratio_B, wd)                          every B (LoRA+, when lr_ratio_B != 1)
    (head_lr,        wd)   (head_lr, 0.0)          the task head (modules_to_save), when head_lr is set
    + step hooks: each level's rows step lr_scale x (lr_rule factor) as far (layers.scale_level_steps)

Groups are made in the order parameters are first met, one per distinct (lr, weight decay);
weight decay applies to matrices only (not biases / norms). ``msplora fit`` builds its AdamW
with this (``MSPLoRAModule.configure_optimizers``); a ``transformers.Trainer`` user passes
``optimizers=(create_optimizer(model, lr=...), None)`` -- peft's ``create_loraplus_optimizer``
has the same role for its own LoRA.

Works on any module that holds an MSPLoRA bank: an injected model, a ``PeftModel`` of
``MSPLoRAPeftConfig``, or a LightningModule around one. Only the core is imported.

``linear_warmup_decay`` is the fit's schedule: transformers' ``get_linear_schedule_with_warmup``
(same factors, step for step), as a ``torch`` ``LambdaLR``. Importing it from transformers pulls in
``transformers.trainer_pt_utils``, hence peft and, where installed, bitsandbytes: seconds of import
and a bitsandbytes kernel message in the log of every fit that quantizes nothing.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from msplora.config import ConfigError
from msplora.layers import PREFIX, MSPLoRABank, scale_level_steps

__all__ = ["create_optimizer", "find_bank", "linear_warmup_decay", "param_groups"]


def find_bank(model: nn.Module) -> MSPLoRABank:
    """The MSPLoRA bank inside ``model`` (at any depth: a PeftModel, a LightningModule)."""
    for mod in model.modules():
        if isinstance(mod, MSPLoRABank):
            return mod
    raise ConfigError("model: has no MSPLoRA adapter. Fix: msplora.inject(model, config) or get_peft_model first")


def param_groups(model: nn.Module, lr: float, head_lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """The optimizer's parameter groups over ``model``'s trainable parameters (table above).

    Args:
        lr: learning rate of the adapter's A (B gets ``lr * config.lr_ratio_B``).
        head_lr: learning rate of every other trainable parameter (task heads); None = ``lr``.
        weight_decay: on parameters with 2+ dimensions; 0 on biases and norms.
    """
    ratio_b = find_bank(model).config.lr_ratio_B
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        adapter = PREFIX in name
        p_lr = lr if adapter or head_lr is None else head_lr
        if adapter and name.endswith(".B") and ratio_b != 1:
            p_lr = p_lr * ratio_b
        wd = weight_decay if p.ndim >= 2 else 0.0
        groups.setdefault((p_lr, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def create_optimizer(
    model: nn.Module,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`param_groups`, with the per-level step hooks of
    ``layers.scale_level_steps`` (exact for AdamW, Adam, SGD, RMSprop; none are registered
    when every level trains at ``lr``). ``optimizer_kwargs`` go to the optimizer (``betas``,
    ``eps``, ...)."""
    opt = optimizer_cls(param_groups(model, lr, head_lr, weight_decay), **optimizer_kwargs)
    scale_level_steps(opt, find_bank(model))
    return opt


def _linear_warmup_decay_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def linear_warmup_decay(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's lr rises linearly from 0 over ``warmup_steps``, then falls linearly to 0 at
    ``total_steps`` (and stays there): the factors of transformers' ``get_linear_schedule_with_warmup``
    (``tests/test_optim.py`` holds them equal), without importing transformers' trainer."""
    factor = partial(_linear_warmup_decay_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
