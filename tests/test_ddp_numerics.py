"""DDP equals one process: 2 gloo ranks x batch b train the same adapter and head as one process
x batch 2b over the same examples, step by step (gradients) and at the end (weights).

Why this needs its own test: the other DDP tests check that the two ranks agree with each other
and that B moved. A gradient summed over ranks instead of averaged, or counted twice on a bank
tensor that several layers share, keeps the ranks in agreement and still trains; only a
comparison against the single process catches it.

Same examples per step: Lightning gives each DDP rank a ``DistributedSampler`` (shuffle on, seed
``PL_GLOBAL_SEED`` + epoch), so rank r sees positions r, r + 2, ... of one seeded permutation. The
single process reads that same permutation whole (a ``DistributedSampler`` with one replica and
the same seed), so its step t batch of 2b is the union of the two ranks' step t batches. The
losses are means over examples (or, for the causal LM, over reply tokens; every example here has
the same length and the same number of reply tokens), so mean of the rank means == the mean over
2b, up to float summation order. Equal-length examples mean no padding differs between a batch
of 2b and two of b. Dropout is 0 in the pyramid and in the backbone (rank streams differ).
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_ddp_script, save_tiny_bert, write_glue_task

CONFIGS = REPO / "configs"

SCRIPT = '''
import os, sys
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from msplora.training.cli import cli_main


class Record(Callback):
    """What the optimizer uses at every step (gradients after DDP's all-reduce, before the update),
    and the premise of the comparison: every batch has one token length (no padding differs)
    and, for the causal LM, every row the same number of reply tokens."""

    def __init__(self):
        self.grads = []
        self.widths = set()
        self.reply_tokens = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.widths.add(batch["input_ids"].shape[1])
        if "labels" in batch and batch["labels"].ndim == 2:  # causal LM: (B, T), -100 off the reply
            self.reply_tokens.update((batch["labels"] != -100).sum(1).tolist())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def one_process_order(datamodule, seed):
    """The single process reads the permutation Lightning's DistributedSampler splits between the ranks."""
    shipped = datamodule.train_dataloader

    def train_dataloader():
        dl = shipped()
        sampler = DistributedSampler(dl.dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, collate_fn=dl.collate_fn)

    datamodule.train_dataloader = train_dataloader


def main(argv):
    cli = cli_main(argv, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    if trainer.world_size == 1:
        one_process_order(dm, int(os.environ["PL_GLOBAL_SEED"]))
    record = Record()
    trainer.callbacks.append(record)
    trainer.fit(model, datamodule=dm)
    assert len(record.widths) == 1 and len(record.reply_tokens) <= 1, (record.widths, record.reply_tokens)
    out = {f"state.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step, grads in enumerate(record.grads):
        out |= {f"grad{step}.{n}": g for n, g in grads.items()}
    torch.save(out, f"{trainer.default_root_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
'''


def run_both(tmp_path: Path, args: list[str], b: int) -> tuple[dict, dict]:
    """(DDP, one process): 2 gloo ranks x batch b (both ranks must agree: checked by
    ``run_ddp_script``), and this process x batch 2b, from the same seed and data."""
    ddp_root, one_root = tmp_path / "ddp", tmp_path / "one"
    ddp_root.mkdir()
    one_root.mkdir()
    ddp = run_ddp_script(
        SCRIPT,
        [
            *args,
            f"--data.init_args.batch_size={b}",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            f"--trainer.default_root_dir={ddp_root}",
        ],
        ddp_root,
    )
    main = runpy.run_path(str(ddp_root / "ddp_script.py"), run_name="one_process")["main"]
    main(
        [*args, f"--data.init_args.batch_size={2 * b}", "--trainer.devices=1", f"--trainer.default_root_dir={one_root}"]
    )
    return ddp, torch.load(one_root / "rank0.pt")


# Tolerances, relative to each tensor's largest entry. Both runs do the same arithmetic except
# the order of float32 sums (the loss: a mean over 2b rows vs the mean of two means over b; GEMM
# blocking for batch b vs 2b; thread counts): a few ulps, ~1e-7 of the gradient's scale.
# * Gradients (what the optimizer gets, after DDP's all-reduce): measured <= 2.4e-6 on both tests
#   over 4 steps; REL_GRAD = 1e-4 leaves 50x margin and sits 1e4x below the faults this test is
#   for: a gradient summed over the 2 ranks instead of averaged is off by 100 %, one rank's loss
#   counted twice by ~50 %.
# * Weights after 4 AdamW steps: AdamW divides each entry by its own sqrt(v) ~ |g|, so an entry
#   whose gradient is near zero turns float noise into a visible share of its (lr-sized) update;
#   measured <= 1.1e-5 (B of query). REL_STATE = 1e-3 leaves ~100x margin; a wrong learning-rate
#   schedule or step count moves every entry by O(lr) per step, 10 % or more of the scale.
REL_GRAD, REL_STATE = 1e-4, 1e-3


def assert_same_training(ddp: dict, one: dict, steps: int) -> None:
    assert ddp.keys() == one.keys()
    assert sorted({k.split(".", 1)[0] for k in one if k.startswith("grad")}) == sorted(f"grad{i}" for i in range(steps))

    def order(key: str) -> tuple[int, str]:  # "grad3.model..." -> (3, ...); the weights after every step
        head = key.split(".", 1)[0]
        return (int(head[4:]) if head.startswith("grad") else steps, key)

    for key in sorted(one, key=order):  # a failure names the first step that diverged
        err, scale = (ddp[key] - one[key]).abs().max().item(), one[key].abs().max().item()
        if key.startswith("state."):
            assert scale > 0, f"{key} is all zero: the comparison would test nothing"
        # (A's gradient at step 0 is exactly zero in both runs: B starts at zero)
        rel = REL_STATE if key.startswith("state.") else REL_GRAD
        assert err <= rel * scale, f"{key}: DDP differs from one process by {err:.3g} (max |value| {scale:.3g})"


@pytest.fixture(scope="module")
def bert_no_dropout(tmp_path_factory) -> Path:
    """The tiny BERT with every dropout off: DDP ranks draw from their own RNG streams, one process from one."""
    return save_tiny_bert(
        tmp_path_factory.mktemp("bert_no_dropout"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_classification(tmp_path, bert_no_dropout):
    """SST-2 layout, 32 equal-length rows, 2 epochs x 2 steps: 2 ranks x 8 == 1 process x 16."""
    data = write_glue_task(tmp_path / "glue", "sst2", n_train=32, n_dev=8)
    args = [
        "--config",
        str(CONFIGS / "base.yaml"),
        f"--model.model={bert_no_dropout}",
        "--model.pyramid.dropout=0",
        "--model.lr=1e-2",  # large enough that the weights move far beyond the tolerance in 4 steps
        "--model.head_lr=2e-2",  # its own parameter group, as in demo.yaml
        "--data.init_args.task=sst2",
        f"--data.init_args.data_dir={data}",
        "--data.init_args.max_length=32",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=2",  # the second epoch checks the samplers' set_epoch agree
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
    ]
    ddp, one = run_both(tmp_path, args, b=8)
    assert {k for k in one if k.startswith("state.")} == {
        f"state.model.{n}"
        for n in (
            "msplora_bank.kinds.query.A",
            "msplora_bank.kinds.query.B",
            "msplora_bank.kinds.value.A",
            "msplora_bank.kinds.value.B",
            "classifier.weight",
            "classifier.bias",
        )
    }  # the adapter (each bank tensor shared by the 4 layers) and the head
    assert_same_training(ddp, one, steps=4)


# Reply "<a> <b>." to "Say <a> <b>.": every word one SmolLM2 token, so every example has the same
# length and the same number of reply tokens (the script checks both).
COLOURS = ["red", "green", "blue", "black", "white", "grey", "brown", "gold"]


@pytest.fixture(scope="module")
def llama_no_dropout(tmp_path_factory) -> Path:
    from tests.tiny import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory, tie_word_embeddings=True, attention_dropout=0.0)


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_causal_lm(tmp_path, llama_no_dropout):
    """Alpaca records, 32 train rows of equal length, 2 epochs x 2 steps: 2 ranks x 8 == 1 process x 16."""
    path = tmp_path / "say.jsonl"
    records = [
        {"instruction": f"Say {a} {b}.", "input": "", "output": f"{a} {b}."} for a in COLOURS for b in COLOURS[:5]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # 40 records: 8 validation, 32 train
    args = [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "instruct_demo.yaml"),
        f"--model.model={llama_no_dropout}",
        "--model.pyramid.dropout=0",
        "--model.lr=1e-2",
        f"--data.init_args.data={path}",
        "--data.init_args.val_size=8",
        "--data.init_args.max_train_samples=null",
        "--data.init_args.group_by_length=false",  # Lightning's DistributedSampler, not a length-grouped order
        "--data.init_args.cutoff_len=64",
        "--trainer.max_epochs=2",
        "--trainer.callbacks=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    ddp, one = run_both(tmp_path, args, b=8)
    assert {k for k in one if k.startswith("state.")} == {
        f"state.model.msplora_bank.kinds.{kind}.{t}" for kind in ("q_proj", "v_proj") for t in "AB"
    }
    assert_same_training(ddp, one, steps=4)
