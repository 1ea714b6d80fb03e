"""Local task files read into the ``nyu-mll/glue`` layout: original GLUE folders
(``<dir>/<TASK>/{train,dev}.tsv``) and HF-layout files (``train.parquet``, ``dev.csv``, ...),
checked column by column and label by label."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import datasets

from msplora.errors import DataError
from msplora.io import parse_jsonl, read_text
from msplora.training.data.tasks import HUB_NAME, TaskSpec

FILE_SUFFIXES = ("tsv", "csv", "jsonl", "json", "parquet")


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
