"""Greedy generation for evaluation: prompts encoded exactly as in training, left-padded and
batched longest-first, replies cut at the stop tokens and decoded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from msplora.training.instruct.records import Message
from msplora.training.instruct.rendering import Template, encode_prompt


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
