"""MT-bench answer files: FastChat `question.jsonl` in, FastChat `model_answer` records out, each
question answered turn by turn, written crash-safe and resumable.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from msplora.io import write_text_atomic
from msplora.training.instruct.generation import generate_answers
from msplora.training.instruct.records import Message
from msplora.training.instruct.rendering import Template


def load_mt_bench_questions(path: str | os.PathLike) -> list[dict]:
    """FastChat `question.jsonl`: one {question_id, category, turns: [str, ...]} per line."""
    questions = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: record {len(questions)} (line {lineno})"
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(q, dict) or "question_id" not in q:
            raise ValueError(f"{where}: missing 'question_id'")
        turns = q.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        questions.append(q)
    return questions


def _read_answer_records(path: Path) -> list[dict]:
    """Complete records of an answer file; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def answer_mt_bench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions_path: str | os.PathLike,
    model_id: str,
    out_path: str | os.PathLike,
    max_new_tokens: int = 1024,
    limit: int | None = None,
    batch_size: int = 8,
    template: Template = "auto",
) -> Path:
    """Write FastChat `model_answer` records for MT-bench questions; returns `out_path`.

    Each turn is answered greedily with the whole conversation so far in the prompt (turn 2
    sees turn 1's question and the model's own answer), as FastChat's `gen_model_answer` does;
    FastChat samples with per-category temperatures, this is greedy (reproducible).

    Crash safety and resume: records are appended, one flushed line per question, to
    `<out_path>.partial`; only when every question is answered is that file renamed to
    `out_path`, so `out_path` is never half written. A rerun skips question ids already in
    `out_path` or in the partial file.
    """
    out, partial = Path(out_path), Path(f"{out_path}.partial")
    questions = load_mt_bench_questions(questions_path)[:limit]
    done: dict[Any, dict] = {}
    for record in _read_answer_records(out) + _read_answer_records(partial):
        if record.get("model_id") != model_id:
            raise ValueError(
                f"{out} (or its .partial) holds answers of model {record.get('model_id')!r}, not {model_id!r}"
            )
        done.setdefault(record["question_id"], record)
    todo = [q for q in questions if q["question_id"] not in done]

    out.parent.mkdir(parents=True, exist_ok=True)
    # Restart the partial file from the complete records (drops a torn line), then append.
    write_text_atomic(
        partial, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8", mode=None
    )
    with partial.open("a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            batch = todo[b : b + batch_size]
            conversations: list[list[Message]] = [[] for _ in batch]
            answers: list[list[str]] = [[] for _ in batch]
            # Turn t of every question in the batch is generated together; questions may differ in turn count.
            for t in range(max(len(q["turns"]) for q in batch)):
                active = [i for i, q in enumerate(batch) if t < len(q["turns"])]
                for i in active:
                    conversations[i].append({"role": "user", "content": batch[i]["turns"][t]})
                replies = generate_answers(
                    model, tokenizer, [conversations[i] for i in active], max_new_tokens, batch_size, template
                )
                for i, reply in zip(active, replies):
                    conversations[i].append({"role": "assistant", "content": reply})
                    answers[i].append(reply)
            for q, turns in zip(batch, answers):
                record = {
                    "question_id": q["question_id"],
                    "answer_id": uuid.uuid4().hex[:22],  # FastChat uses a 22-char shortuuid
                    "model_id": model_id,
                    "choices": [{"index": 0, "turns": turns}],
                    "tstamp": time.time(),
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[q["question_id"]] = record
            f.flush()
            os.fsync(f.fileno())

    # Final file in question order; earlier answers not in this question file are kept after them.
    order = {q["question_id"]: i for i, q in enumerate(questions)}
    records = sorted(done.values(), key=lambda r: order.get(r["question_id"], len(order)))
    write_text_atomic(
        out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8", mode=None
    )
    partial.unlink()
    return out
