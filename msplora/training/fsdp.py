"""FSDP for the pyramid: torch's FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

    root unit  (embeddings, final norm, task head, msplora_bank: every A/B, fp32)
      |  gathered at the root's forward and kept for the whole step
      +-- block 0 unit  (frozen q/k/v/o/mlp shards; MSPLoRALinear -> bank: a reference, not a child)
      +-- block 1 unit
      ...

Each transformer block is its own unit (its class is read from the model: the class of the
numbered entries, ``layers.N`` / ``layer.N`` / ``h.N`` / ``blocks.N``, that hold adapted layers;
every module of that class is a unit, as a transformer auto-wrap policy does); everything else,
the shared bank and the head included, sits in the root unit. A block's wrapped layers reach the
bank through non-owning references, so while any block runs the bank is already gathered.

Why not Lightning's ``FSDPStrategy`` (``--trainer.strategy=fsdp``, FSDP1): it refuses CPU, so nothing
about it could be tested here, and its checkpoints gather the full model state. This strategy is
registered as ``msplora_fsdp``; the CLI maps ``fsdp`` to it on a GPU and refuses ``fsdp`` on a CPU
in one line naming ``msplora_fsdp`` (:func:`resolve_strategy`), so both use the one tested path.

Loading: only rank 0 reads the base; the other ranks build it on the meta device (MSPLoRAModule
does so under this strategy), and after sharding rank 0 broadcasts each tensor, every rank keeping
its own shard (:func:`load_from_rank0`): one copy of the base in host memory, not one per rank.

Checkpoints hold the trainable tensors only (adapter and head, whole, not sharded: 150 MB at 70B,
0.6 GB with AdamW's moments), their optimizer state and the loop state, in one file written by
rank 0: the frozen base is never gathered or saved (``ignore_frozen_params``). Mixed precision: keep the base stored in bf16
(``model.dtype: bfloat16``); ``param_dtype`` casts the blocks' all-gathered parameters only, the
root unit (the bank) is never cast, and gradients are reduced in fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

import msplora
from msplora.sharding import is_sharded, local_part, local_slice, unsharded  # noqa: F401 (re-exported)

STRATEGY_NAME = "msplora_fsdp"


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The numbered blocks that hold wrapped (adapted) layers, in order: ``<stack>.<N>`` for every
    ``<stack>.<N>.<...>`` target name (``msplora.inject``'s layer-index rule)."""
    from msplora.inject import BLOCK_PATTERN, wrapped_layers  # the package's own layer-index rule

    names = []
    for name, _ in wrapped_layers(model):
        m = BLOCK_PATTERN.match(name)
        if m is not None and f"{m['stack']}.{m['idx']}" not in names:
            names.append(f"{m['stack']}.{m['idx']}")
    if not names:
        raise msplora.ConfigError(
            "trainer.strategy: FSDP found no adapted transformer blocks (no layers.N / layer.N / h.N / blocks.N "
            "holding MSPLoRA layers). Fix: inject the pyramid first, or use --trainer.strategy=ddp"
        )
    return [model.get_submodule(n) for n in names]


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The transformer block class(es) of ``model``, found from it (never a hard-coded list)."""
    return {type(b) for b in transformer_blocks(model)}


def shard(
    model: nn.Module, mesh=None, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> nn.Module:
    """``fully_shard`` every module of the block class(es), then the root (the bank, the head, embeddings).

    ``param_dtype``: compute dtype of the blocks' gathered (frozen) weights; the root is never
    cast, so the bank keeps its fp32. Gradients (bank and head only) are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m) in classes]
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    return model


def _tensors(model: nn.Module):
    """Every parameter (tied ones once) and buffer, by name: what a rank-0 load must fill."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for _, t in _tensors(model))


def load_from_rank0(model: nn.Module, whole: dict[str, torch.Tensor] | None, device: torch.device, rank: int) -> None:
    """Fill a sharded model whose ranks other than 0 hold a meta-device skeleton: rank 0 passes its
    whole tensors (``whole``, taken before sharding), broadcast one at a time, and each rank copies
    its own shard (a DTensor's local part) or the whole buffer. Host memory: one copy of the base,
    on rank 0, instead of one per rank. All ranks first check that they hold the same names,
    shapes and dtypes, and all refuse together if not."""
    import torch.distributed as dist

    if rank == 0 and any(t.is_meta for t in whole.values()):
        raise RuntimeError("load_from_rank0: rank 0 holds meta tensors; it must load the real weights")
    if rank != 0:
        model.to_empty(device=device)  # after fully_shard: allocates each rank's shard only
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in _tensors(model)]
    ref = [layout]
    dist.broadcast_object_list(ref, src=0, device=device)
    differs = [a for a, b in zip(layout, ref[0]) if a != b] or ([] if len(layout) == len(ref[0]) else ["(count)"])
    flag = torch.tensor([float(bool(differs))], device=device)
    dist.all_reduce(flag)
    if flag.item():
        raise msplora.ConfigError(
            f"trainer.strategy={STRATEGY_NAME}: rank {rank}'s model differs from rank 0's at "
            f"{differs[0] if differs else 'another rank'}. Fix: build the same model on every rank"
        )
    with torch.no_grad():
        for name, t in _tensors(model):
            full = (
                whole[name].to(device).contiguous() if rank == 0 else torch.empty(t.shape, dtype=t.dtype, device=device)
            )
            dist.broadcast(full, src=0)
            local_part(t).copy_(local_slice(full, t))  # a DTensor's shard, or the whole buffer


class PyramidFSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes, sharded as :func:`shard` says; adapter-only
    checkpoints in one file. Runs on GPUs (NCCL) and on CPU (gloo).

    Args:
        param_dtype: compute dtype of the blocks' gathered weights (``bfloat16``); None = as stored.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3);
            False keeps them until backward (ZeRO-2-like: faster, more memory).
        process_group_backend: None = NCCL on GPUs, gloo on CPU.
    """

    strategy_name = STRATEGY_NAME

    def __init__(
        self,
        param_dtype: str | None = None,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        # Pure data parallelism (no tensor-parallel dimension) and one checkpoint file holding the
        # trainable tensors only; the signature is explicit so that a YAML `init_args` cannot
        # bring back ModelParallelStrategy's own defaults for these.
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
        )
        self.param_dtype = param_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the node count (it expects tensor parallelism
        # inside a node); pure FSDP shards over every process. A private attribute of
        # ModelParallelStrategy: its constructor takes only a number, unknown before the launch.
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        module = self.lightning_module
        model = getattr(module, "model", None)
        if model is None:
            raise msplora.ConfigError(
                f"trainer.strategy={STRATEGY_NAME}: the LightningModule has no built `model` after configure_model. "
                "Fix: use MSPLoRAModule (or build self.model in configure_model)"
            )
        if not is_sharded(model):
            dtype = getattr(torch, self.param_dtype) if self.param_dtype else None
            # Ranks other than 0 may hold a meta-device skeleton of the base (MSPLoRAModule builds
            # one there): rank 0 keeps references to its whole tensors while sharding, then sends them.
            skeleton = self.reduce_boolean_decision(has_meta_tensors(model), all=False)
            whole = dict(_tensors(model)) if skeleton and self.global_rank == 0 else None
            shard(model, self.device_mesh["data_parallel"], dtype, self.reshard_after_forward)
            if skeleton:
                load_from_rank0(model, whole, self.root_device, self.global_rank)
            del whole
        super().setup(trainer)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full tensors of the trainable parameters (and buffers) only: frozen base weights are
        neither gathered nor copied (a collective; rank 0 gets the tensors)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        # Lightning's loader takes the tensors out of the checkpoint it returns; put their names
        # and shapes back, so MSPLoRAModule.on_load_checkpoint checks that they fit this model.
        path = Path(self.broadcast(checkpoint_path))
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True).get("state_dict", {})
        checkpoint = super().load_checkpoint(path, weights_only=weights_only)
        checkpoint["state_dict"] = saved
        return checkpoint


def resolve_strategy(strategy: Any, accelerator: Any) -> Any:
    """``fsdp`` -> this package's strategy on a GPU; on a CPU a one-line refusal naming it.
    Anything else is returned unchanged."""
    if strategy != "fsdp":
        return strategy
    gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    if not gpu:
        raise msplora.ConfigError(
            f"trainer.strategy: fsdp needs a GPU (accelerator={accelerator!r} here). "
            f"Fix: --trainer.strategy={STRATEGY_NAME}, the same FSDP2 path, which also runs on CPU with gloo"
        )
    return STRATEGY_NAME


def register() -> None:
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(
            STRATEGY_NAME, PyramidFSDPStrategy, description="MSPLoRA: FSDP2, bank in the root unit, adapter-only ckpt"
        )


register()
