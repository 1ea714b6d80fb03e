"""FSDP (``--trainer.strategy=msplora_fsdp``, torch's FSDP2 through Lightning) on 2 gloo ranks:
it trains the adapter and head one process trains, its checkpoints hold the trainable tensors
only, a killed FSDP fit resumed from ``last`` ends where the uninterrupted one ends; the unit
layout (blocks found from the model, bank in the root) and the ``fsdp``-on-CPU refusal.

Same examples per step as tests/test_ddp_numerics.py (read its docstring): rank r reads positions
r, r + 2, ... of one seeded permutation, one process reads it whole with twice the batch."""

from __future__ import annotations

import json
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import msplora
from msplora.inject import ADAPTER_WEIGHTS
from msplora.training.cli import cli_main
from tests.conftest import REPO, run_ddp_script, save_tiny_bert, write_glue_task
from tests.test_resume import KILL_SCRIPT, fit_args

CONFIGS = REPO / "configs"

# Saves every trainable tensor whole (a DTensor shard is gathered) as <root>/rank<r>.pt.
SCRIPT = """
import os, sys
import torch
from torch.utils.data import DataLoader, DistributedSampler

from msplora.training.cli import cli_main


def whole(t):
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()  # a DTensor under FSDP


def main(argv):
    if argv and argv[0] == "fit":  # the `msplora fit` path: run API, checkpoints, best_adapter/
        cli = cli_main(argv)
        trainer, model = cli.trainer, cli.model
    else:
        cli = cli_main(argv, run=False)
        trainer, model, dm = cli.trainer, cli.model, cli.datamodule
        if trainer.world_size == 1:  # read the permutation the two ranks' DistributedSamplers split
            shipped, seed = dm.train_dataloader, int(os.environ["PL_GLOBAL_SEED"])

            def train_dataloader():
                dl = shipped()
                sampler = DistributedSampler(dl.dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
                return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, collate_fn=dl.collate_fn)

            dm.train_dataloader = train_dataloader
        trainer.fit(model, datamodule=dm)
    out = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    torch.save(out, f"{trainer.default_root_dir}/rank{trainer.global_rank}.pt")
    # the frozen base and every buffer, and whether this rank built the base on the meta device
    base = {n: whole(p) for n, p in model.model.named_parameters() if not p.requires_grad}
    base.update({n: whole(b) for n, b in model.model.named_buffers()})
    torch.save({"skeleton": model.base_skeleton, "tensors": base}, f"{trainer.default_root_dir}/base{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
"""


def run_ranks(script_dir: Path, args: list[str], root: Path) -> dict[str, torch.Tensor]:
    """Run SCRIPT on 2 gloo processes (Lightning re-executes the command for rank 1); both ranks
    must hold the same whole tensors, and have trained. Returns rank 0's."""
    return run_ddp_script(SCRIPT, args, root, script_dir=script_dir)


@pytest.fixture(scope="module")
def bert_no_dropout(tmp_path_factory) -> Path:
    return save_tiny_bert(
        tmp_path_factory.mktemp("bert_no_dropout"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


FSDP = ["--trainer.devices=2", "--trainer.strategy=msplora_fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting", [[], ["--model.quantize=nf4"], ["--model.pyramid.lr_rule=layers"]], ids=["plain", "nf4", "level_lr"]
)
def test_fsdp_two_ranks_train_what_one_process_trains(tmp_path, bert_no_dropout, setting):
    """SST-2 layout, 32 equal-length rows, 2 epochs x 2 steps: 2 FSDP ranks x 8 == 1 process x 16,
    adapter and head within 1e-5 (measured ~2.4e-7: float summation order). The FSDP run also
    checkpoints its activations, as the 13B/70B recipes do (it must not change the numbers).
    ``nf4``: QLoRA under FSDP (every rank reads the 4-bit base; FSDP shards the packed bytes and
    bitsandbytes finds each weight's quantization state again after the all-gather).
    ``level_lr``: per-level learning rates (a cell serving n layers steps 1/n as far), applied to
    each rank's shard of the bank."""
    quantize = "--model.quantize=nf4" in setting
    if quantize:
        pytest.importorskip("bitsandbytes")
    data = write_glue_task(tmp_path / "glue", "sst2", n_train=32, n_dev=8)
    args = [
        *setting,
        "--config",
        str(CONFIGS / "base.yaml"),
        f"--model.model={bert_no_dropout}",
        "--model.pyramid.dropout=0",
        "--model.lr=1e-2",  # the weights move far beyond the tolerance in 4 steps
        "--model.head_lr=2e-2",
        "--data.init_args.task=sst2",
        f"--data.init_args.data_dir={data}",
        "--data.init_args.max_length=32",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
    ]
    fsdp_root, one_root = tmp_path / "fsdp", tmp_path / "one"
    fsdp_root.mkdir()
    one_root.mkdir()
    fsdp = run_ranks(
        tmp_path,
        [
            *args,
            "--data.init_args.batch_size=8",
            *FSDP,
            "--model.gradient_checkpointing=true",
            f"--trainer.default_root_dir={fsdp_root}",
        ],
        fsdp_root,
    )
    main = runpy.run_path(str(tmp_path / "ddp_script.py"), run_name="one_process")["main"]
    main([*args, "--data.init_args.batch_size=16", "--trainer.devices=1", f"--trainer.default_root_dir={one_root}"])
    one = torch.load(one_root / "rank0.pt")
    assert sorted(one) == sorted(
        f"model.{n}"
        for n in (
            "msplora_bank.kinds.query.A",
            "msplora_bank.kinds.query.B",
            "msplora_bank.kinds.value.A",
            "msplora_bank.kinds.value.B",
            "classifier.weight",
            "classifier.bias",
        )
    )
    assert fsdp.keys() == one.keys()
    for k in one:
        assert one[k].abs().max() > 1e-3, f"{k} is ~0: the comparison would test nothing"  # B, bias start at 0
        err = (fsdp[k] - one[k]).abs().max().item()
        assert err <= 1e-5, f"{k}: FSDP differs from one process by {err:.3g}"
    # the base: 4-bit packed bytes under nf4 (so it did run quantized), the same on both sides
    base_fsdp, base_one = (torch.load(root / "base0.pt")["tensors"] for root in (fsdp_root, one_root))
    assert any(t.dtype == torch.uint8 for t in base_one.values()) == bool(quantize)
    assert base_fsdp.keys() == base_one.keys() and all(torch.equal(base_fsdp[k], base_one[k]) for k in base_one)


@pytest.mark.slow
def test_killed_fsdp_fit_resumes_to_the_uninterrupted_adapter_from_an_adapter_only_checkpoint(tmp_path, tiny_bert_dir):
    """2 FSDP ranks, 3 epochs of 3 steps, last.ckpt every 2 steps, SIGKILL at step 5, then
    ``--ckpt_path last``: the same final adapter and head as the run never killed. The checkpoint
    holds the trainable tensors (whole), their AdamW moments and the loop state: its tensors'
    bytes are the adapter state's, never the frozen base's."""
    extra = ["--trainer.max_epochs=3", "--last_checkpoint.every_n_steps=2", *FSDP]  # base.yaml's callbacks too
    whole_root, killed_root = tmp_path / "whole", tmp_path / "killed"
    whole_root.mkdir()
    killed_root.mkdir()
    whole = run_ranks(tmp_path, ["fit", *fit_args(whole_root, tiny_bert_dir, *extra)], whole_root)
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "kill.py"), "5", *fit_args(killed_root, tiny_bert_dir, *extra)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last_path = killed_root / "version_0" / "checkpoints" / "last.ckpt"
    last = torch.load(last_path, weights_only=True)
    assert last["global_step"] == 4

    # What the checkpoint holds: exactly the trainable tensors, whole, and nothing of the base.
    assert last["state_dict"].keys() == whole.keys()
    assert all(last["state_dict"][k].shape == whole[k].shape for k in whole)
    adapter_bytes = sum(t.numel() * t.element_size() for t in whole.values())
    state_bytes = sum(t.numel() * t.element_size() for t in last["state_dict"].values())
    assert state_bytes == adapter_bytes
    moments = [s for s in last["optimizer_states"][0]["state"].values()]
    assert sum(s[m].numel() * s[m].element_size() for s in moments for m in ("exp_avg", "exp_avg_sq")) == (
        2 * adapter_bytes
    )
    base_bytes = sum(p.stat().st_size for p in tiny_bert_dir.glob("*.safetensors"))
    # tensors: adapter + 2 moments; the rest is loop/callback state and hyperparameters (pickled)
    assert last_path.stat().st_size < 3 * adapter_bytes + 64_000 < base_bytes / 10

    resumed = run_ranks(
        tmp_path, ["fit", *fit_args(killed_root, tiny_bert_dir, *extra), "--ckpt_path=last"], killed_root
    )
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6, rtol=0) for k in whole)
    a, b = (json.loads((r / "version_0" / "metrics.json").read_text()) for r in (whole_root, killed_root))
    assert a["global_step"] == b["global_step"] == 9
    # SpectrumRecorder (base.yaml) reads the whole bank at each epoch end: the last record is the
    # spectrum of the final global query delta s B A (s = alpha / r = 2; its rows come first).
    for root in (whole_root, killed_root):
        records = json.loads((root / "version_0" / "spectra.json").read_text())["records"]
        assert [r["epoch"] for r in records] == [0, 1, 2]
    a, b = whole["model.msplora_bank.kinds.query.A"][:8], whole["model.msplora_bank.kinds.query.B"][:, :8]
    sv = torch.linalg.svdvals(2.0 * b @ a)[:8]
    assert torch.allclose(torch.tensor(records[-1]["level"]["global/query/0"]), sv, rtol=1e-4, atol=1e-6)
    # best_adapter/ is written with whole tensors (rank 0, after gathering the root unit)
    best = load_file(killed_root / "version_0" / "best_adapter" / ADAPTER_WEIGHTS)
    for kind in ("query", "value"):  # (cells, r, d_in) whole: a shard would hold half the rows
        assert best[f"global.{kind}.A"].shape == (1, 8, 32) and best[f"layer.{kind}.A"].shape == (4, 2, 32)
    assert best["modules_to_save.classifier.weight"].shape == (2, 32)


def test_blocks_are_found_from_the_model_and_the_bank_stays_in_the_root(tiny_bert_dir):
    """The unit layout, on one gloo rank: every adapted block its own FSDP unit (its class read
    from the model), the bank and head in the root; unsharded() gives whole bank tensors."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForSequenceClassification

    from msplora.training import fsdp

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    msplora.inject(model, msplora.MSPLoRAConfig(targets=["query", "value"], modules_to_save=["classifier"]))
    assert {c.__name__ for c in fsdp.block_classes(model)} == {"BertLayer"}
    with socket.socket() as s:  # a free port; nothing set in os.environ (later subprocess tests inherit it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        fsdp.shard(model)
        blocks = fsdp.transformer_blocks(model)
        assert len(blocks) == 4 and all(isinstance(b, FSDPModule) for b in blocks)
        assert isinstance(model, FSDPModule) and fsdp.is_sharded(model)
        bank = msplora.get_bank(model)
        assert not any("msplora_bank" in n for b in blocks for n, _ in b.named_parameters())  # references only
        assert hasattr(bank.kinds["query"].A, "full_tensor")  # sharded, so by the root unit
        with fsdp.unsharded(model):
            assert not hasattr(bank.kinds["query"].A, "full_tensor")  # a plain tensor while gathered
            assert bank.kinds["query"].A.dtype == torch.float32
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a `python -m msplora` subprocess
def test_fsdp_on_cpu_is_refused_in_one_line_naming_the_alternative(tmp_path, tiny_bert_dir):
    with pytest.raises(msplora.ConfigError, match=r"fsdp needs a GPU .*--trainer\.strategy=msplora_fsdp"):
        cli_main(["fit", *fit_args(tmp_path, tiny_bert_dir, "--trainer.strategy=fsdp", "--trainer.devices=2")])
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run(
        [sys.executable, "-m", "msplora", "fit", *fit_args(tmp_path, tiny_bert_dir, "--trainer.strategy=fsdp")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    lines = [line for line in proc.stderr.strip().splitlines() if "msplora_fsdp" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]


def test_fsdp_is_the_package_strategy_on_a_gpu_and_other_strategies_pass_through():
    from msplora.training.fsdp import resolve_strategy

    assert resolve_strategy("ddp", "cpu") == "ddp"
    assert resolve_strategy("fsdp", "gpu") == "msplora_fsdp"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 6-layer random LLaMA (tied embeddings, GQA) with SmolLM2's tokenizer, as a local folder."""
    from tests.tiny import tiny_llama_folder

    return tiny_llama_folder(
        tmp_path_factory, num_hidden_layers=6, max_position_embeddings=512, tie_word_embeddings=True
    )


@pytest.mark.slow
def test_70b_fsdp_recipe_fits_a_tiny_llama_on_two_ranks(tmp_path, tiny_llama_dir):
    """The 70B recipe as shipped (bf16-mixed, bf16 base, param_dtype bf16, activation checkpointing,
    base.yaml's callbacks), on a tiny LLaMA and 2 CPU ranks for 2 steps: the causal-LM path under
    FSDP (tied embeddings and lm_head in the root unit) trains the fp32 bank on both ranks alike."""
    data = tmp_path / "alpaca.jsonl"
    records = [{"instruction": f"Name item {i}.", "input": "", "output": "Blue."} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    root = tmp_path / "run"
    root.mkdir()
    configs = ("base.yaml", "llama2_7b_alpaca.yaml", "llama2_70b_alpaca_fsdp.yaml")
    args = [a for name in configs for a in ("--config", str(CONFIGS / name))]
    args += [
        f"--model.model={tiny_llama_dir}",
        f"--trainer.default_root_dir={root}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.max_steps=2",
        "--trainer.accumulate_grad_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.data={data}",
        "--data.init_args.val_size=8",
        "--data.init_args.cutoff_len=64",
        "--data.init_args.num_workers=0",
        "--data.init_args.eval_batch_size=4",
    ]
    state = run_ranks(tmp_path, ["fit", *args], root)
    assert sorted(state) == [f"model.msplora_bank.kinds.{k}.{t}" for k in ("q_proj", "v_proj") for t in "AB"]
    assert all(v.dtype == torch.float32 for v in state.values())  # the bank is never cast
    assert all(state[f"model.msplora_bank.kinds.{k}.B"].abs().sum() > 0 for k in ("q_proj", "v_proj"))
    config = (root / "version_0" / "config.yaml").read_text()
    assert "PyramidFSDPStrategy" in config and "gradient_checkpointing: true" in config
    assert_rank1_got_the_base_from_rank0(root, tiny_llama_dir)


def assert_rank1_got_the_base_from_rank0(root: Path, model_dir: Path) -> None:
    """Only rank 0 read the weights (rank 1 built a meta-device skeleton), and after the fit both
    ranks hold rank 0's frozen base and buffers bit for bit (rotary ``inv_freq`` and the tied
    embedding included), which are the file's."""
    from transformers import AutoModelForCausalLM

    b0, b1 = torch.load(root / "base0.pt"), torch.load(root / "base1.pt")
    assert (b0["skeleton"], b1["skeleton"]) == (False, True)
    t0, t1 = b0["tensors"], b1["tensors"]
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    inv_freq = [k for k in t0 if k.endswith("rotary_emb.inv_freq")]
    assert inv_freq and torch.equal(t0[inv_freq[0]], ref.model.rotary_emb.inv_freq)
    assert torch.equal(t0["model.embed_tokens.weight"], ref.model.embed_tokens.weight)
    q = [k for k in t0 if ".layers.5.self_attn.q_proj." in k and k.endswith("weight")]
    assert len(q) == 1 and torch.equal(t0[q[0]], ref.model.layers[5].self_attn.q_proj.weight)
