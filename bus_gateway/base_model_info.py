"""What the gateway needs to know about a base model: is it served, its vocabulary size (token-id checks),
context length, architecture and tokenizer. Read from the model's config.json via resolve_base_model, once."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from tinker_bus.base_models import load_tokenizer, resolve_base_model


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    vocab_size: int
    max_context_length: int | None
    arch: str | None


def _read_info(name: str) -> BaseModelInfo:
    config = json.loads((resolve_base_model(name) / "config.json").read_text())
    text = config.get("text_config") or {}  # multimodal configs nest the language model's settings
    vocab = config.get("vocab_size") or text.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"base model {name!r}: config.json has no usable vocab_size")
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    return BaseModelInfo(name, vocab, context if isinstance(context, int) else None, config.get("model_type"))


class BaseModelCatalog:
    def __init__(self, served: tuple[str, ...]) -> None:
        self.served = served
        self._info: dict[str, BaseModelInfo] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def is_served(self, name: str) -> bool:
        return name in self.served

    async def info(self, name: str) -> BaseModelInfo:
        """Cached; the first call per model reads (or for SmolLM2 first converts) it in a worker thread."""
        if name in self._info:
            return self._info[name]
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._info:
                self._info[name] = await asyncio.to_thread(_read_info, name)
        return self._info[name]

    async def tokenizer(self, name: str) -> Any:
        return await asyncio.to_thread(load_tokenizer, name)  # load_tokenizer caches per name
