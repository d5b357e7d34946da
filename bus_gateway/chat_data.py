"""Chat conversations -> training datums for the JSON API: tokenized with the base model's chat template,
loss weight 1 on the assistant turns only (the role header that opens a turn is prompt, not target)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bus_gateway.errors import FieldError


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], field: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1]))
        if not text.startswith(_render(tokenizer, messages[: i + 1])):
            raise FieldError(f"{field}[{i}]", "the chat template does not render this conversation turn by turn")
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], field: str) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, per-token 0/1 mask of assistant tokens) of one conversation."""
    if not messages:
        raise FieldError(field, "a conversation needs at least one message")
    if not any(m["role"] == "assistant" for m in messages):
        raise FieldError(field, "a conversation needs at least one assistant message to train on")
    try:
        text, spans = assistant_spans(tokenizer, messages, field)
    except FieldError:
        raise
    except Exception as exc:  # the template rejects the conversation (e.g. roles out of order)
        raise FieldError(field, f"chat template failed: {exc}") from exc
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(ids.size, dtype=np.float32)
    for start, end in spans:
        mask[(starts >= start) & (starts < end)] = 1.0
    if ids.size < 2:
        raise FieldError(field, "the conversation tokenizes to fewer than 2 tokens")
    return ids, mask


def prompt_for_messages(tokenizer: Any, messages: list[dict[str, str]], field: str = "messages") -> np.ndarray:
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    except Exception as exc:
        raise FieldError(field, f"chat template failed: {exc}") from exc
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return np.asarray(ids, dtype=np.int64)
