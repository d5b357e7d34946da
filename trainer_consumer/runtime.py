"""What an op handler can reach: the backend (through the one compute thread), storage (through I/O threads),
and the trainer's settings."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from artifact_store import CheckpointStore, ObjectStore, Registry
from bus_runtime.errors import UserError
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.config import TrainerConfig

R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass
class Storage:
    checkpoints: CheckpointStore
    registry: Registry

    @classmethod
    def on(cls, objects: ObjectStore) -> Storage:
        return cls(CheckpointStore(objects), Registry(objects))


@dataclass
class Runtime:
    backend: TrainingBackend
    storage: Storage
    config: TrainerConfig
    base_models: tuple[str, ...] | None  # None: any (a replay serves whatever the log trained)
    # One thread owns the device: backend calls run there one at a time, in the order they were submitted, while
    # the asyncio loop keeps polling Kafka and heart-beating.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-compute"))

    async def compute(self, fn: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def io(self, fn: Callable[..., R], *args: object, **kwargs: object) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def check_base_model(self, name: str) -> None:
        if self.base_models is not None and name not in self.base_models:
            raise UserError(f"base_model {name!r} is not served by this trainer; served: {list(self.base_models)}")

    async def close(self, timeout_s: float) -> None:
        """Close the backend on the compute thread, after the step running there (the calls queued behind it were
        cancelled with their tasks), waiting at most `timeout_s`; a step still running then is left to the process
        exit."""
        closing = self.executor.submit(self.backend.close)
        self.executor.shutdown(wait=False, cancel_futures=False)
        try:
            await asyncio.wait_for(asyncio.wrap_future(closing), timeout_s)
        except TimeoutError:
            log.warning("the backend was not closed: a step still runs after %.0f s", timeout_s)
        except Exception:
            log.exception("closing the backend failed")


def default_seed(model_id: str) -> int:
    """The adapter seed when create_model gives none: stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:8], "little") & ((1 << 63) - 1)
