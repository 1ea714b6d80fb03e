"""``make bench``: training-step and inference time, every variant interleaved in one process.

Variants of one training step (forward + backward + AdamW step, batch 16 x 128, MiniLM):
  floor      frozen base, nothing trainable but a tiny input scale, so backward still
             runs through every layer (the cost no adapter can go below)
  peft_lora  peft LoRA r=8 on query/value
  fused      MSPLoRA 8/4/2 (3 groups), one gather + two matmuls per wrapped layer
  separate   the same pyramid, but one down/up matmul pair per level (three branches)
  compiled   ``fused`` under torch.compile (inductor), as ``--model.compile=true`` trains
             (``--no-compile`` leaves it out; compiling takes a minute or two on a small CPU)
Inference (no grad): base, MSPLoRA merged, MSPLoRA unmerged.

Rounds run the variants in turn (a few steps each) so drift and noise hit all alike; the
median step time per variant is reported. The last line reads ``fused/peft_lora: X.XX``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import msplora
from msplora.errors import ArgumentParser
from msplora.layers import MSPLoRALinear


class SeparateBranches(MSPLoRALinear):
    """Reference implementation: one matmul pair per level (what fusion avoids).

    Everything else is the fused forward's (same guards, casts and one dropout mask for all
    levels), so the timing difference is the per-level matmuls alone; tests/test_bench.py checks
    that both give the same outputs and gradients.
    """

    def forward(self, x, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return out
        kb = self._bank
        xd = self.dropout(x.to(kb.A.dtype))  # (..., d_in): one mask, shared by every level
        for k, lv in enumerate(kb.levels):
            start = kb.offsets[k] + kb.cells[k][self.pos] * lv.rank
            a = kb.A[start : start + lv.rank]  # (r_k, d_in) view
            b = kb.B[:, start : start + lv.rank]  # (d_out, r_k) view
            out = out + (F.linear(F.linear(xd, a), b) * lv.scale).to(out.dtype)  # (..., d_out)
        return out


def separate_branches(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every wrapped layer of an injected model to :class:`SeparateBranches`, in place.

    The bank (the same A and B) is kept: only the forward changes."""
    for _, layer in msplora.wrapped_layers(model):
        layer.__class__ = SeparateBranches
    return model


def _minilm():
    from transformers import AutoModel

    from msplora.hf import resolve_model

    return AutoModel.from_pretrained(resolve_model("minilm"))


def _builders():
    from peft import LoraConfig, get_peft_model

    base = _minilm()
    cfg = dict(targets=["query", "value"], dropout=0.05)

    def floor():
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(False)
        # one trainable scalar at the input keeps backward flowing through every layer
        m.embeddings.LayerNorm.weight.requires_grad_(True)
        return m

    def peft_lora():
        return get_peft_model(
            copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"])
        )

    def fused():
        return msplora.inject(copy.deepcopy(base), msplora.MSPLoRAConfig(**cfg))

    def separate():
        return separate_branches(fused())

    return base, {"floor": floor, "peft_lora": peft_lora, "fused": fused, "separate": separate}


def _batch(batch: int, length: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }


def _time(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="msplora bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time the compiled variant")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, builders = _builders()
    x = _batch(args.batch, args.length, base.config.vocab_size)

    def train_step_fn(model):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            out = model(**x).last_hidden_state
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    train = {name: train_step_fn(build()) for name, build in builders.items()}
    if args.compile:
        compiled = builders["fused"]()
        compiled.compile()  # in place, as MSPLoRAModule does for model.compile
        train["compiled"] = train_step_fn(compiled)

    merged = builders["fused"]()
    unmerged = builders["fused"]()
    for m in (merged, unmerged):
        for kb in m.msplora_bank.kinds.values():
            torch.nn.init.normal_(kb.B.data, std=0.01)
    msplora.merge(merged)
    infer_models = {"base": copy.deepcopy(base), "merged": merged, "unmerged": unmerged}

    def infer_fn(model):
        model.eval()

        def step():
            with torch.inference_mode():
                model(**x)

        return step

    infer = {name: infer_fn(m) for name, m in infer_models.items()}
    for fn in [*train.values(), *infer.values()]:  # warm-up
        fn()
    times = {name: [] for name in [*train, *infer]}
    for _ in range(args.rounds):
        for table in (train, infer):
            for name, fn in table.items():
                times[name].append(_time(fn, args.steps))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch} x {args.length}, "
        f"{args.rounds} rounds x {args.steps} steps, median seconds per step"
    )
    print("training step (forward + backward + AdamW):")
    for name in train:
        print(f"  {name:10s} {med[name] * 1000:8.1f} ms  ({med[name] / med['peft_lora']:.3f}x peft_lora)")
    print("inference (no grad):")
    for name in infer:
        print(f"  {name:10s} {med[name] * 1000:8.1f} ms  ({med[name] / med['base']:.3f}x base)")
    print(f"separate/fused: {med['separate'] / med['fused']:.2f}")
    print(f"merged/base: {med['merged'] / med['base']:.3f}")
    if "compiled" in med:
        print(f"compiled/fused (inductor vs eager): {med['compiled'] / med['fused']:.2f}")
    print(f"fused/peft_lora: {med['fused'] / med['peft_lora']:.2f}")


if __name__ == "__main__":
    main()
