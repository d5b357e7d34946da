"""Loaded LoRA adapters of one base model, keyed by (tinker path, manifest version), LRU-evicted.

Keying by the manifest version (not by sampling session or path alone) is what makes a sampling client
see exactly the weights saved before it was created: an overwritten path has a new version, so it is
loaded afresh. An evicted adapter is simply loaded again on its next use.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from artifact_store import CheckpointNotFound, CheckpointStore, InvalidPath, TinkerPath
from bus_runtime.base_models import resolve_base_model
from sampler_consumer.lora import AdapterError, LoraAdapter, LoraBank

log = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    pass


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0


def same_base_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return resolve_base_model(a) == resolve_base_model(b)
    except FileNotFoundError:
        return False


class AdapterCache:
    def __init__(self, checkpoints: CheckpointStore, bank: LoraBank, base_model: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("adapter cache capacity must be >= 1")
        self.checkpoints = checkpoints
        self.bank = bank
        self.base_model = base_model
        self.capacity = capacity
        self.stats = CacheStats()
        self._adapters: OrderedDict[tuple[str, str], LoraAdapter] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._adapters

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Keys from least to most recently used."""
        return iter(list(self._adapters))

    def get(self, path: str) -> LoraAdapter:
        """The adapter currently stored at `path` (a tinker:// sampler_weights path)."""
        try:
            tinker_path = TinkerPath.parse(path)
        except InvalidPath as exc:
            raise AdapterNotFound(str(exc)) from exc
        try:
            info = self.checkpoints.info(tinker_path)
        except CheckpointNotFound as exc:
            raise AdapterNotFound(f"no checkpoint at {path} (never saved, deleted or expired)") from exc
        key = (str(tinker_path), info.version)
        if key in self._adapters:
            self.stats.hits += 1
            self._adapters.move_to_end(key)
            return self._adapters[key]
        try:
            ckpt, info = self.checkpoints.load_with_info(tinker_path)
        except CheckpointNotFound as exc:
            raise AdapterNotFound(f"no checkpoint at {path} (deleted while loading)") from exc
        if not same_base_model(info.base_model, self.base_model):
            raise AdapterError(f"{path} was trained on {info.base_model!r}, not on {self.base_model!r}")
        adapter = self.bank.parse(ckpt, (str(tinker_path), info.version))
        self.stats.loads += 1
        log.info("loaded adapter %s (version %s, rank %d, %.1f MB)", path, info.version, adapter.rank,
                 adapter.nbytes / 1e6)
        self._adapters[adapter.key] = adapter
        return adapter

    def trim(self, in_use: Collection[tuple[str, str]] = ()) -> None:
        """Evict least recently used adapters down to capacity, never one the current batch uses."""
        for key in list(self._adapters):
            if len(self._adapters) <= self.capacity:
                return
            if key not in in_use:
                del self._adapters[key]
                self.stats.evictions += 1
                log.info("evicted adapter %s (version %s)", *key)
