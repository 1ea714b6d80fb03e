"""Rendering a conversation to model input: the tokenizer's chat template (or an Alpaca prompt),
the character spans of the assistant replies, and the token ids with their loss mask (labels
-100 off the replies) for training, or the prompt ids for generation.
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

from msplora.training.instruct.records import Message

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, padding); the default `ignore_index` of cross-entropy."""

Template = Literal["auto", "chat", "alpaca"]

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


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
