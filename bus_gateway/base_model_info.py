"""The gateway's view of base models: which are served, their facts (bus_runtime.base_models.BaseModelInfo, read
once per model off the event loop) and tokenizers."""

from __future__ import annotations

import asyncio
from typing import Any

from bus_runtime.base_models import BaseModelInfo, load_tokenizer, read_base_model_info


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
                self._info[name] = await asyncio.to_thread(read_base_model_info, name)
        return self._info[name]

    async def tokenizer(self, name: str) -> Any:
        return await asyncio.to_thread(load_tokenizer, name)  # load_tokenizer caches per name
