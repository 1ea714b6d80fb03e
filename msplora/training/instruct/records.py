"""Instruction records: Alpaca, chat (`messages`) and ShareGPT (`conversations`) records from a
JSON/JSONL file or a Hub dataset, normalised to one conversation shape (a list of `Message`s) and
checked to be trainable; also the validation-split size every source shares.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from msplora.errors import DataError
from msplora.io import parse_jsonl

Message = dict[str, str]
"""{"role": "system" | "user" | "assistant", "content": str}"""

# ShareGPT speaker names seen in the wild -> chat roles.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


_RECORD_FIX = (
    "fix that record: Alpaca records need 'instruction' and 'output' strings ('input' optional), "
    "chat records a 'messages' list, ShareGPT records a 'conversations' list"
)


def _check_conversation(messages: list[Message]) -> str | None:
    """What is wrong with a normalised conversation, or None when it is trainable."""
    if not messages:
        return "the conversation is empty"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        if m["role"] == "system":
            return "a system message may only come first"
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            # Most chat templates assume strict alternation and some raise on anything else.
            return f"turn {i} is from {m['role']!r}, expected {expected!r} (user and assistant must alternate)"
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn, so nothing to train on"
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        return "an assistant turn is empty"
    return None


def normalize_record(record: Any, source: str = "<records>", index: int = 0) -> list[Message]:
    """Turn one Alpaca, chat (`messages`) or ShareGPT (`conversations`) record into messages.

    A trailing user turn (no reply to learn) is dropped. Raises `DataError` (a `ValueError`)
    naming `source`, `index` and the fault for anything else that does not fit.
    """

    def fail(what: str) -> DataError:
        return DataError(f"{source}: record {index}: {what}. Fix: {_RECORD_FIX}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")

    if "messages" in record or "conversations" in record:
        sharegpt = "messages" not in record
        key, role_key, text_key = ("conversations", "from", "value") if sharegpt else ("messages", "role", "content")
        turns = record[key]
        if not isinstance(turns, list):
            raise fail(f"'{key}' must be a list, got {type(turns).__name__}")
        messages: list[Message] = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise fail(f"'{key}'[{t}] must be an object with '{role_key}' and '{text_key}'")
            role, text = turn[role_key], turn[text_key]
            role = _SHAREGPT_ROLES.get(str(role).lower()) if sharegpt else role
            if role not in ("system", "user", "assistant"):
                raise fail(f"'{key}'[{t}] has unknown {role_key} {turn[role_key]!r}")
            if not isinstance(text, str):
                raise fail(f"'{key}'[{t}].{text_key} must be a string, got {type(text).__name__}")
            messages.append({"role": role, "content": text})
    elif "instruction" in record or "output" in record:
        for field, required in (("instruction", True), ("input", False), ("output", True)):
            value = record.get(field)
            if value is None and not required:
                continue
            if not isinstance(value, str):
                got = "missing" if field not in record else f"a {type(value).__name__}"
                raise fail(f"Alpaca field '{field}' must be a string, got {got}")
        instruction, extra = record["instruction"].strip(), (record.get("input") or "").strip()
        if not instruction:
            raise fail("Alpaca field 'instruction' is empty")
        # The input is folded into the user turn, so Alpaca data renders through any chat template.
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    else:
        raise fail(
            "unknown record format: expected 'instruction'+'output' (Alpaca), 'messages' (chat) "
            f"or 'conversations' (ShareGPT); got keys {sorted(record)}"
        )

    problem = _check_conversation(messages)
    if problem:
        raise fail(problem)
    if messages[-1]["role"] == "user":
        messages.pop()  # checked above that an earlier assistant turn exists
    return messages


def _read_json_records(path: Path) -> list[Any]:
    """A JSON list, or JSONL (one object a line), whatever the suffix says."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSONL under a .json name: fall through
        else:
            if isinstance(data, list):
                return data
            raise DataError(
                f"{path}: expected a JSON list of records, got a {type(data).__name__}. "
                "Fix: write the records as one JSON list, or one JSON object a line (JSONL)"
            )
    return parse_jsonl(text, path, fix="fix or remove that line (one JSON object a line)", error=DataError)


def load_conversations(data: str, split: str = "train") -> list[list[Message]]:
    """Conversations from a local JSON/JSONL file or a Hub dataset (`datasets.load_dataset(data, split=split)`)."""
    path = Path(data).expanduser()
    if path.is_file():
        records: Iterable[Any] = _read_json_records(path)
        source = str(path)
    else:
        records = hub_records(data, split)
        source = f"hub:{data}[{split}]"
    return [normalize_record(r, source, i) for i, r in enumerate(records)]


def hub_records(data: str, split: str = "train") -> Iterable[Any]:
    """The records of the Hub dataset ``data`` (fetched into the ``datasets`` cache), or a
    ``DataError`` when ``data`` is a missing file or no dataset that can be read."""
    path = Path(data).expanduser()
    if path.suffix in (".json", ".jsonl") or data.startswith((".", "/", "~")):
        raise DataError(
            f"instruction data file {path} does not exist. Fix: check the path (a JSON list or a JSONL "
            "file of Alpaca, chat or ShareGPT records)"
        )
    import datasets  # heavy import; only the Hub path needs it

    try:
        return datasets.load_dataset(data, split=split)
    except (FileNotFoundError, ConnectionError) as e:  # DatasetNotFoundError is a FileNotFoundError
        reason = " ".join(str(e).split())[:200]
        raise DataError(
            f"data {data!r}: no such file, and no Hub dataset of that name can be read ({reason}). Fix: give "
            "the path of a JSON/JSONL file of records, or a Hub dataset name that exists (cached beforehand "
            "when offline)"
        ) from None


def _n_val(val_size: int | float, n: int) -> int:
    """Validation examples out of `n`: `val_size` is a fraction (float) or a count (int)."""
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size={val_size}: a float is a fraction in [0, 1); give an int for a count")
        return round(val_size * n)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size}: must be a count in [0, {n}) for {n} examples")
    return val_size
