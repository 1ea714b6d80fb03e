"""Which modules of a Hugging Face model are wrapped, their layer index and kind, and the bank
that would serve them (checked before anything is touched)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from msplora.config import ConfigError, MSPLoRAConfig
from msplora.layers import PREFIX, KindBank, MSPLoRABank, MSPLoRALinear
from msplora.quant import is_quantized
from msplora.quant import shape as quantized_shape

BLOCK_PATTERN = re.compile(r"^(?P<stack>(?:.*\.)?(?:layer|layers|h|block|blocks))\.(?P<idx>\d+)\.(?P<rel>.+)$")


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
        m = BLOCK_PATTERN.match(name)
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


def target_layout(model: nn.Module, config: MSPLoRAConfig) -> dict[str, dict]:
    """What `inject` would build, without building it: kind -> {d_in, d_out, layers}."""
    plan = _plan(model, config)
    return {
        kind: {"d_in": ts[0].shape[0], "d_out": ts[0].shape[1], "layers": [t.layer_id for t in ts]}
        for kind, ts in plan.items()
    }
