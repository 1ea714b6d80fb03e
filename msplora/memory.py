"""Expected memory per device of a fit: a small model of what each device holds, from the model's
shape, the pyramid and the strategy. It is an estimate (no allocator fragmentation beyond a fixed
allowance), written beside each recipe in configs/ and checked there by tests/test_memory.py.

    per device = base weights (bf16 / nf4; FSDP: 1/N, + 2 gathered blocks + the gathered root)
               + adapter: fp32 weights, grads, AdamW moments (FSDP: grads and moments 1/N)
               + activations kept for backward (gradient checkpointing: each block's input,
                 + one block's worth while it is recomputed)
               + logits (bf16 out, fp32 for the loss, fp32 grad)
               + a fixed runtime allowance (CUDA context, kernels, workspace)

Activations per token per block, 16-bit elements, for a LLaMA block with hidden h, key/value
width kv and MLP width i: the inputs of both norms and of the attention and MLP projections,
q/k/v outputs, the attention output, gate/up/act outputs and the down input: 6h + 2kv + 4i.
The attention matrix is not stored (PyTorch's SDPA kernels recompute it), nor are the frozen
projections' inputs counted twice.

Host memory: each rank reads the whole base in its storage dtype before sharding, so a node needs
(ranks on it) x (base size) of RAM: the loader is not yet meta-device (a limit, README: FSDP).

``python -m msplora.memory --config configs/base.yaml --config configs/<recipe>.yaml`` prints it
(LLaMA-family causal LMs: the shapes and projections above).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from msplora.pyramid import parameter_count

GIB = 1024**3
RUNTIME_BYTES = 1.0 * GIB  # CUDA context + cuBLAS/NCCL workspaces: a fixed allowance
# Bytes per weight: nf4 = 4 bits + double-quantised absmax (8 bits per 64, fp32 per 256 x 64):
# 4.127 bits (QLoRA, Dettmers et al. 2023, section 3).
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "nf4": (4 + 8 / 64 + 32 / (64 * 256)) / 8}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A LLaMA-family decoder's shape (``transformers`` config field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config) -> Shape:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            kv,
            bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden_size // self.num_attention_heads * self.num_key_value_heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Each block linear map: name -> (d_in, d_out)."""
        h, kv, i = self.hidden_size, self.kv_width, self.intermediate_size
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def block_linear_params(self) -> int:
        return sum(a * b for a, b in self.projection_shapes().values())

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden_size  # + two RMSNorm weights

    @property
    def root_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the final norm: FSDP's root unit (without the bank)."""
        embed = self.vocab_size * self.hidden_size
        return embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.block_params + self.root_params


# Shapes of the recipes' bases, from their published config.json (so nothing is downloaded).
KNOWN_SHAPES: dict[str, Shape] = {
    "meta-llama/Llama-2-7b-hf": Shape(32000, 4096, 11008, 32, 32, 32),
    "meta-llama/Llama-2-13b-hf": Shape(32000, 5120, 13824, 40, 40, 40),
    "meta-llama/Llama-2-70b-hf": Shape(32000, 8192, 28672, 80, 64, 8),
}


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per device, by part
    host_bytes: float = 0.0  # host RAM per node while loading (FSDP: rank 0 reads the base; DDP, QLoRA: every rank)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def gib(self) -> float:
        """Per device, GiB rounded to 0.1 (the figure written in the recipes)."""
        return round(self.total / GIB, 1)

    def table(self) -> str:
        rows = [f"  {name:<18s} {value / GIB:8.2f} GiB" for name, value in self.parts.items()]
        rows.append(f"  {'per device':<18s} {self.total / GIB:8.2f} GiB")
        rows.append(f"  {'host RAM (load)':<18s} {self.host_bytes / GIB:8.2f} GiB per node")
        return "\n".join(rows)


def estimate(
    shape: Shape,
    levels: Sequence[Mapping],
    targets: Sequence[str],
    *,
    strategy: str = "ddp",
    devices: int = 1,
    micro_batch: int = 1,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    base_dtype: str = "bfloat16",
    quantize: str | None = None,
) -> Estimate:
    """Bytes per device of a causal-LM fit (``strategy``: ``ddp`` = a whole copy per device,
    ``fsdp`` = :mod:`msplora.training.fsdp`'s layout over ``devices``)."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy: {strategy!r} is not ddp or fsdp")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"targets: {unknown} are not LLaMA projections {PROJECTIONS}")
    n = devices if strategy == "fsdp" else 1
    b16 = BYTES_PER_WEIGHT[base_dtype]
    # QLoRA quantises the blocks' linear maps; embeddings, lm_head and norms stay in base_dtype.
    linear_b = BYTES_PER_WEIGHT[quantize] if quantize else b16
    block_bytes = shape.block_linear_params * linear_b + 2 * shape.hidden_size * b16
    root_bytes = shape.root_params * b16
    base_bytes = shape.num_hidden_layers * block_bytes + root_bytes

    shapes = {t: shape.projection_shapes()[t] for t in targets}
    adapter = parameter_count(levels, shape.num_hidden_layers, shapes)
    parts = {"base weights": base_bytes / n}
    if strategy == "fsdp":
        parts["gathered units"] = 2 * block_bytes + root_bytes  # computing + prefetched block; the root
    # fp32 weights (whole while gathered), fp32 grads, AdamW's two fp32 moments (FSDP: sharded)
    parts["adapter + AdamW"] = adapter * 4 + adapter * 12 / n

    tokens = micro_batch * seq_len
    h, kv, i = shape.hidden_size, shape.kv_width, shape.intermediate_size
    per_block = tokens * (6 * h + 2 * kv + 4 * i) * 2  # bytes kept for backward, one block
    if gradient_checkpointing:
        parts["activations"] = shape.num_hidden_layers * tokens * h * 2 + per_block
    else:
        parts["activations"] = shape.num_hidden_layers * per_block
    parts["logits"] = tokens * shape.vocab_size * (2 + 4 + 4)
    parts["runtime"] = RUNTIME_BYTES
    # FSDP: only rank 0 reads the base, the others build it on the meta device and receive their
    # shards (msplora.training.fsdp.load_from_rank0); quantized bases are read by every rank.
    readers = 1 if strategy == "fsdp" and not quantize else devices
    return Estimate(parts, host_bytes=readers * shape.params * b16)


def shape_of(model: str) -> Shape:
    """A known recipe base by name, else the config.json of a local folder or cached Hub model."""
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    from transformers import AutoConfig

    from msplora.hf import resolve_model

    return Shape.from_config(AutoConfig.from_pretrained(resolve_model(model)))


def estimate_fit(cli) -> Estimate:
    """The estimate for a parsed fit (``cli_main(args, run=False)``): model, pyramid, strategy,
    devices, micro-batch, cutoff length, checkpointing, dtype and quantisation from its config."""
    from msplora.training.fsdp import PyramidFSDPStrategy

    hp, dm, trainer = cli.model.hparams, cli.datamodule, cli.trainer
    pyramid = cli.model.pyramid
    levels = [
        {"share": lv.share, "rank": lv.rank, "groups": lv.groups, "group_size": lv.group_size} for lv in pyramid.levels
    ]
    fsdp = isinstance(trainer.strategy, PyramidFSDPStrategy)
    return estimate(
        shape_of(hp.model),
        levels,
        list(pyramid.targets),
        strategy="fsdp" if fsdp else "ddp",
        devices=trainer.num_devices,
        micro_batch=getattr(dm, "batch_size", None) or dm.hparams.get("batch_size") or 1,
        seq_len=getattr(dm, "cutoff_len", None) or dm.hparams.get("max_length") or 512,
        gradient_checkpointing=bool(hp.gradient_checkpointing),
        base_dtype=hp.dtype,
        quantize=hp.get("quantize"),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m msplora.memory --config ... [--key=value]``: the estimate for that fit (on this
    machine the trainer is parsed with a CPU accelerator; devices and strategy are the config's)."""
    from msplora.training.cli import cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    cli = cli_main([*argv, "--trainer.accelerator=cpu", "--trainer.logger=false"], run=False, exit_on_error=False)
    try:
        est = estimate_fit(cli)
    except (ValueError, AttributeError) as e:  # not a LLaMA-family model: say so in one line
        print(
            f"msplora.memory: {e}. Fix: estimate LLaMA-family causal LMs (q/k/v/o/gate/up/down_proj)", file=sys.stderr
        )
        return 2
    print(est.table())
    print(f"memory per device: {est.gib} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
