"""From encoded examples to batches: packing examples into fixed-length blocks and the collator
that right-pads {input_ids, labels} into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from msplora.training.instruct.rendering import IGNORE_INDEX


def pack_examples(examples: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut blocks of `block_size` tokens; labels move with their tokens.

    The last, shorter block is kept (the collator pads it); blocks with no trained token are dropped.
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    blocks = []
    for i in range(0, len(ids), block_size):
        block_labels = labels[i : i + block_size]
        if any(t != IGNORE_INDEX for t in block_labels):
            blocks.append({"input_ids": ids[i : i + block_size], "labels": block_labels})
    return blocks


class InstructionCollator:
    """Right-pads a list of {input_ids, labels} to a batch of tensors (labels padded with -100)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),  # (B, T)
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),  # (B, T)
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),  # (B, T)
        }
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(ex["labels"])
        return batch
