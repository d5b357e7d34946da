"""Adapter checkpoints read from S3, keyed by (tinker path, manifest version), kept in a host-memory LRU.

Keying by the manifest version (not by sampling session or path alone) is what makes a sampling client see
exactly the weights saved before it was created: an overwritten path has a new version, so it is read afresh.
These are CPU tensors only; the engine thread parses them into its adapter slots (lora.AdapterSlots) and keeps
the slot while the version is in use, so a new version never disturbs requests still running on the old one.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from artifact_store import CheckpointNotFound, CheckpointStore, InvalidPath, TinkerPath
from bus_runtime.base_models import resolve_base_model
from sampler_consumer.lora import AdapterError
from sampler_consumer.requests import AdapterCheckpoint

log = logging.getLogger(__name__)


class AdapterNotFound(LookupError):
    pass


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0


def same_base_model(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return resolve_base_model(a) == resolve_base_model(b)
    except FileNotFoundError:
        return False


class AdapterCache:
    def __init__(self, checkpoints: CheckpointStore, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("adapter cache capacity must be >= 1")
        self.checkpoints = checkpoints
        self.capacity = capacity
        self.stats = CacheStats()
        self._adapters: OrderedDict[tuple[str, tuple[str, str]], AdapterCheckpoint] = OrderedDict()
        self._lock = threading.Lock()

    def holds(self, path: str, base_model: str) -> bool:
        """Whether some version of the adapter at `path` is loaded (a metrics lookup: no S3 request)."""
        with self._lock:
            return any(model == base_model and key[0] == path for model, key in self._adapters)

    def get(self, path: str, base_model: str) -> AdapterCheckpoint:
        """The adapter currently stored at `path` (a tinker:// sampler_weights path), trained on `base_model`."""
        try:
            tinker_path = TinkerPath.parse(path)
        except InvalidPath as exc:
            raise AdapterNotFound(str(exc)) from exc
        try:
            info = self.checkpoints.info(tinker_path)
        except CheckpointNotFound as exc:
            raise AdapterNotFound(f"no checkpoint at {path} (never saved, deleted or expired)") from exc
        key = (str(tinker_path), info.version)
        with self._lock:
            cached = self._adapters.get((base_model, key))
            if cached is not None:
                self.stats.hits += 1
                self._adapters.move_to_end((base_model, key))
                return cached
        try:
            ckpt, info = self.checkpoints.load_with_info(tinker_path)
        except CheckpointNotFound as exc:
            raise AdapterNotFound(f"no checkpoint at {path} (deleted while loading)") from exc
        if not same_base_model(info.base_model, base_model):
            raise AdapterError(f"{path} was trained on {info.base_model!r}, not on {base_model!r}")
        adapter = AdapterCheckpoint((str(tinker_path), info.version), ckpt)
        log.info("read adapter %s (version %s)", path, info.version)
        with self._lock:
            self.stats.loads += 1
            self._adapters[(base_model, adapter.key)] = adapter
            while len(self._adapters) > self.capacity:
                self._adapters.popitem(last=False)
        return adapter
