"""``GLUEDataModule``: a task's splits (carved, subset), tokenised and padded per batch."""

from __future__ import annotations

import datasets
import lightning as L
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from msplora.errors import DataError
from msplora.hf import check_model_name
from msplora.training.data.builtin import BUILTINS
from msplora.training.data.loading import load_task
from msplora.training.data.splits import holdout_split
from msplora.training.data.tasks import TaskSpec, get_task
from msplora.training.loader import ResumableDataLoader, ResumableRandomSampler


def _tokenize(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, fields: tuple[str, ...], max_length: int
) -> dict[str, list]:
    # No padding here: DataCollatorWithPadding pads each batch to its own longest row.
    return tokenizer(*[batch[f] for f in fields], truncation=True, max_length=max_length)  # one text or a pair


class GLUEDataModule(L.LightningDataModule):
    """Tokenised, dynamically padded loaders for one task of ``TASKS``.

    Batches are dicts of tensors: ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for
    BERT-style tokenizers) padded to the longest row of the batch, and ``labels`` (long, or float
    for regression). Loader lists follow ``val_names`` / ``test_names`` (two for mnli).
    """

    def __init__(
        self,
        task: str = "sentiment",
        data_dir: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            task: one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, sentiment, boolq.
            data_dir: folder of GLUE files (original ``<TASK>/train.tsv`` layout or HF-layout
                ``train.<ext>``); None loads ``nyu-mll/glue`` from the Hub. Ignored for built-ins.
            tokenizer: tokenizer folder or Hub name, usually the model's path. May be left None
                if the LightningModule sets ``tokenizer_name`` or ``tokenizer`` before ``setup``.
            max_length: truncate token sequences to this length.
            batch_size: training batch size.
            eval_batch_size: validation/test batch size; None = ``batch_size``.
            num_workers: DataLoader worker processes.
            val_fraction: if > 0, hold out this fraction of train (seeded, stratified) as the
                validation split for model selection, and serve the task's dev split as ``test``.
            max_train_samples: keep a seeded random subset of this many training rows.
            max_eval_samples: keep a seeded random subset of this many rows in each eval split.
            seed: seed of the held-out split and of the subsets.
        """
        super().__init__()
        get_task(task)  # fail at config time, not after a model has loaded
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(
                f"val_fraction must be in [0, 1), got {val_fraction}. Fix: e.g. 0.1; 0 uses the task's dev split"
            )
        for name, value in [
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
            ("max_train_samples", max_train_samples),
            ("max_eval_samples", max_eval_samples),
        ]:
            if value is not None and value < 1:
                raise DataError(f"{name} must be >= 1, got {value}. Fix: set data.init_args.{name} to 1 or more")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.raw: datasets.DatasetDict | None = None  # normalised text, after split carving and subsetting
        self.datasets: datasets.DatasetDict | None = None  # tokenised
        self._prepared: datasets.DatasetDict | None = None  # read (and checked) by prepare_data

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.hparams.task)

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def val_names(self) -> list[str]:
        """Names of the validation splits, in ``val_dataloader`` order."""
        return ["validation"] if self.hparams.val_fraction > 0 else list(self.spec.eval_splits)

    @property
    def test_names(self) -> list[str]:
        """Names of the test splits, in ``test_dataloader`` order: the task's dev split(s)."""
        if self.hparams.val_fraction > 0:
            return [s.replace("validation", "test") for s in self.spec.eval_splits]
        return list(self.spec.eval_splits)

    def prepare_data(self) -> None:
        # Runs on one process: fill the Hub caches before every rank's setup reads them. Lightning
        # calls it before it creates the run folder, so local files are read and checked here too:
        # a bad file is refused before anything is written (setup reuses what was read).
        if self.spec.name not in BUILTINS:
            self._prepared = load_task(self.spec.name, self.hparams.data_dir)
        if self.tokenizer is None and self.tokenizer_name is not None:
            check_model_name(self.tokenizer_name)  # a Hub name offline must be in the Hub cache
            AutoTokenizer.from_pretrained(self.tokenizer_name)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets is not None:  # Lightning calls setup once per stage
            return
        hp = self.hparams
        loaded = self._prepared if self._prepared is not None else load_task(self.spec.name, hp.data_dir)
        self._prepared = None
        train = loaded[self.spec.train_split]
        dev = {s: loaded[s] for s in self.spec.eval_splits}
        if hp.val_fraction > 0:
            train, held = holdout_split(train, hp.val_fraction, hp.seed, stratify=not self.spec.is_regression)
            splits = {"train": train, "validation": held}
            splits |= {t: dev[s] for t, s in zip(self.test_names, self.spec.eval_splits)}
        else:
            splits = {"train": train, **dev}
        for name, ds in splits.items():
            limit = hp.max_train_samples if name == "train" else hp.max_eval_samples
            if limit is not None and limit < len(ds):
                # Seeded random subset: several GLUE files are sorted (CoLA by source, STS-B by genre).
                splits[name] = ds.shuffle(seed=hp.seed).select(range(limit))
        self.raw = datasets.DatasetDict(splits)
        self.tokenizer = self._get_tokenizer()
        # A plain function, not a method: datasets hashes the function to fingerprint the result,
        # and hashing a bound method would pickle the whole DataModule, data included.
        kwargs = {"tokenizer": self.tokenizer, "fields": self.spec.text_fields, "max_length": hp.max_length}
        self.datasets = self.raw.map(
            _tokenize, batched=True, fn_kwargs=kwargs, remove_columns=[*self.spec.text_fields, "idx"]
        )
        self.collator = DataCollatorWithPadding(self.tokenizer)

    def _get_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is None:
            raise DataError("no tokenizer. Fix: pass tokenizer=<model folder or Hub name> to GLUEDataModule")
        tok = AutoTokenizer.from_pretrained(self.tokenizer_name)
        if tok.pad_token is None:  # decoder-only tokenizers (GPT-2, LLaMA) ship without one
            tok.pad_token = tok.eos_token
        return tok

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        if self.datasets is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        hp = self.hparams
        dataset = self.datasets[name]
        # The train loader is resumable mid-epoch (msplora.training.loader); its sampler draws the
        # order `shuffle=True` drew, so runs started before it existed see the same data.
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size,
            sampler=ResumableRandomSampler(dataset) if train else None,
            collate_fn=self.collator,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(n) for n in self.val_names]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(n) for n in self.test_names]
        return loaders[0] if len(loaders) == 1 else loaders
