"""Trainers that take a peft model train the pyramid: transformers.Trainer, TRL's SFTTrainer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from msplora.peft import MSPLoRAPeftConfig
from tests.conftest import minilm_dir
from tests.tiny import VOCAB, tiny_bert, tiny_llama


class Batches(torch.utils.data.Dataset):
    """Random token sequences with labels: enough for a few optimiser steps."""

    def __init__(self, n: int = 16, length: int = 8, vocab: int = VOCAB, label: bool = True) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g) if label else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.slow
def test_hf_trainer_trains_adapter_and_head_only_and_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_bert()
    pm = get_peft_model(copy.deepcopy(base), MSPLoRAPeftConfig(targets=["query", "value"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        logging_strategy="no",
    )
    Trainer(model=pm, args=args, train_dataset=Batches()).train()
    moved = changed(before, pm)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    # exactly the adapter (the bank's A and B per kind) and peft's trained copy of the head
    assert moved == trainable
    assert trainable == {
        "base_model.model.msplora_bank.kinds.query.A",
        "base_model.model.msplora_bank.kinds.query.B",
        "base_model.model.msplora_bank.kinds.value.A",
        "base_model.model.msplora_bank.kinds.value.B",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
    pm.save_pretrained(tmp_path / "ad")
    pm.eval()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    x = Batches()[0]
    batch = {k: v[None] for k, v in x.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, pm(**batch).logits)


@pytest.mark.slow
def test_trl_sft_trainer_with_a_pyramid_peft_config(tmp_path):
    """TRL needs Python >= 3.11; it is a test extra (pyproject.toml) where it installs."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(minilm_dir())  # a real tokenizer, offline; the model is tiny
    model = tiny_llama(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    texts = ["the cat sat on the mat", "a pyramid of low rank parts", "shared by the layers of one cell"] * 4
    data = Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts]})  # pre-tokenised: no chat template
    cfg = MSPLoRAPeftConfig(targets=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=cfg)
    pm = trainer.model
    assert isinstance(pm, PeftModel) and isinstance(pm.peft_config["default"], MSPLoRAPeftConfig)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    trainer.train()
    moved = changed(before, pm)
    assert moved == {n for n, p in pm.named_parameters() if p.requires_grad}
    assert moved and all(".msplora_bank." in n for n in moved)
