"""Whole tensors from an FSDP2-sharded model, for code that reads the adapter (saving, spectra).

Torch only, so every floor may use it; the FSDP strategy itself is msplora/training/fsdp.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """True for a module that ``fully_shard`` made an FSDP unit (the root, under FSDP)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the root unit's parameters (the bank, the head) are whole tensors, so readers such
    as ``msplora.save_adapter`` see full values. A collective: enter it on every rank, then let
    rank 0 write. Nothing happens for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_slice(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (broadcastable to ``like``) cut as ``like`` is sharded: the part that meets this
    rank's shard, with no communication; ``whole`` itself when ``like`` is not a DTensor."""
    if not hasattr(like, "to_local"):
        return whole
    from torch.distributed.tensor import distribute_tensor

    full = whole.expand(like.shape).contiguous()
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
