"""The engine's recovery collaborator (docs/recovery.md): restores a model from its snapshot when the trainer first
meets it, snapshots each model at clean gradient windows and records progress markers in between, and tells the
worker which offsets it must not commit yet (durability.py). It works on a model only through the stream's public
API and only between two of the model's events (the engine calls it from the model's lane).

- A model met for the first time is restored before its events are accepted (they wait, see stream.Phase).
- Each model is snapshotted when its window is clean: at once after create / load / unload, then every N optimizer
  steps or T seconds; the capture is synchronous, the upload runs in the background.
- A model with nothing lasting since its snapshot records a small progress marker instead (rate-limited).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from artifact_store import Checkpoint
from bus_runtime.errors import UserError
from trainer_consumer.durability import Capture
from trainer_consumer.model_state import ModelState
from trainer_consumer.ops.checkpoints import training_state
from trainer_consumer.ops.install import install
from trainer_consumer.runtime import Runtime
from trainer_consumer.snapshots import Snapshot, SnapshotStore
from trainer_consumer.stream import ModelStream, Phase

log = logging.getLogger(__name__)

RESTORE_ATTEMPTS = 5  # reading a snapshot: transient S3 errors are retried with backoff, then the engine fails
Partition = tuple[str, int]
Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task]


class Recovery:
    """`restore`: rebuild models from their snapshots when first met. `persist`: write snapshots and markers (the
    live trainer does both; a replay of the log restores at most, and never writes)."""

    def __init__(self, runtime: Runtime, snapshots: SnapshotStore, spawn: Spawn, *, restore: bool, persist: bool):
        self.runtime = runtime
        self.snapshots = snapshots
        self.spawn = spawn
        self.restore = restore
        self.persist = persist
        self.writers: dict[str, asyncio.Task] = {}  # per model: its snapshot / marker upload in flight

    # ------------------------------------------------------------------ restore
    async def restore_model(self, stream: ModelStream) -> None:
        """Install the model's snapshot, if it has one (the stream holds its events meanwhile)."""
        snapshot = await self._read_snapshot(stream.model_id)
        if snapshot is None:
            return
        state = ModelState.from_record(snapshot.record)
        if not state.unloaded:
            try:
                self.runtime.check_base_model(state.base_model)
            except UserError as exc:
                stream.unavailable = f"model {stream.model_id} cannot be restored on this trainer: {exc}"
                log.error("%s", stream.unavailable)
                return
            await install(self.runtime, state, snapshot.checkpoint, with_optimizer=True, register_run=False)
        stream.restored(state, snapshot.point, snapshot.version)
        log.info("restored model %s from its snapshot: step %d, seq_id %s, log offset %s", stream.model_id,
                 state.step, snapshot.point.last_seq, snapshot.point.max_offset)

    async def _read_snapshot(self, model_id: str) -> Snapshot | None:
        for attempt in range(RESTORE_ATTEMPTS):
            try:
                return await self.runtime.io(self.snapshots.load, model_id)
            except Exception as exc:
                if attempt == RESTORE_ATTEMPTS - 1:
                    raise
                delay = 0.5 * 2 ** attempt
                log.warning("reading the snapshot of %s failed (%s); retrying in %.1f s", model_id, exc, delay)
                await asyncio.sleep(delay)
        return None

    # ------------------------------------------------------------------ what is due
    def _snapshot_due(self, stream: ModelStream) -> bool:
        state, config = stream.state, self.runtime.config
        return state is not None and (state.unloaded or state.window_clean) and \
            stream.durability.snapshot_due(config.snapshot_every_steps, config.snapshot_interval_s,
                                           config.snapshot_write_share)

    def _marker_due(self, stream: ModelStream) -> bool:
        return stream.state is not None and stream.durability.marker_due(self.runtime.config.marker_interval_s)

    def due(self, stream: ModelStream) -> bool:
        """A snapshot or marker is due (time-based, or after a failed write) for a model that may be idle."""
        return self.persist and stream.phase is Phase.ACTIVE and (self._snapshot_due(stream)
                                                                  or self._marker_due(stream))

    # ------------------------------------------------------------------ writes
    async def persist_if_due(self, stream: ModelStream) -> None:
        """Between two events of the model: start its snapshot or marker when one is due."""
        if not self.persist or stream.phase is not Phase.ACTIVE:
            return
        if self._snapshot_due(stream):
            await self._start_snapshot(stream)
        elif self._marker_due(stream):  # at most every marker_interval_s
            self._start_marker(stream)

    async def final_persist(self, stream: ModelStream) -> None:
        """On a hand-over, once the model's lane is idle: snapshot what a clean window allows, else a marker."""
        state, durability = stream.state, stream.durability
        if not self.persist or state is None or durability.writing is not None:
            return
        if durability.dirty and (state.unloaded or state.window_clean):
            await self._start_snapshot(stream)
        elif not durability.dirty and durability.hold is not None and durability.snapshot_version is not None:
            self._start_marker(stream)

    async def _start_snapshot(self, stream: ModelStream) -> None:
        """Capture the model between two of its events; the upload goes on in the background."""
        state = stream.state
        assert state is not None
        record = state.record(None, None)
        capture = stream.durability.capture("snapshot")
        try:
            if state.unloaded:  # a tombstone: nothing left to hold but the record
                config: dict[str, Any] = {}
                weights: dict[str, Any] = {}
                optimizer: dict[str, Any] = {}
            else:
                adapter, optimizer = await self.runtime.compute(training_state, self.runtime.backend, state.model_id)
                config, weights = adapter.config, adapter.weights
        except BaseException:
            stream.durability.failed(capture)
            raise
        checkpoint = Checkpoint(config, weights, optimizer)
        write = functools.partial(self.snapshots.save, state.model_id, checkpoint, record, capture.point)
        self._start_write(stream, capture, write)

    def _start_marker(self, stream: ModelStream) -> None:
        durability = stream.durability
        version = durability.snapshot_version
        assert version is not None
        capture = durability.capture("marker")
        self._start_write(stream, capture,
                          functools.partial(self.snapshots.save_progress, stream.model_id, version, capture.point))

    def _start_write(self, stream: ModelStream, capture: Capture, write: Callable[[], str | None]) -> None:
        self.writers[stream.model_id] = self.spawn(self._write(stream, capture, write),
                                                   f"trainer-{capture.kind}-{stream.model_id}")

    async def _write(self, stream: ModelStream, capture: Capture, write: Callable[[], str | None]) -> None:
        try:
            version = await self.runtime.io(write)
        except Exception as exc:
            log.warning("%s of model %s failed (%s); its offsets stay uncommitted until a later one succeeds",
                        capture.kind, stream.model_id, exc)
            stream.durability.failed(capture)
        else:
            stream.durability.written(capture, version)
            log.debug("%s of %s written: seq_id %s, offset %s", capture.kind, stream.model_id,
                      capture.point.last_seq, capture.point.max_offset)
        finally:
            self.writers.pop(stream.model_id, None)

    async def wait_writes(self, model_ids: Iterable[str], timeout_s: float) -> None:
        writers = [self.writers[m] for m in model_ids if m in self.writers]
        if writers:
            await asyncio.wait(writers, timeout=timeout_s)

    def cancel_write(self, model_id: str) -> None:
        writer = self.writers.pop(model_id, None)
        if writer is not None and not writer.done():
            writer.cancel()

    # ------------------------------------------------------------------ what may be committed
    @staticmethod
    def holds(streams: Iterable[ModelStream]) -> dict[Partition, int]:
        """Per partition, the lowest offset some model still needs re-read after a crash."""
        out: dict[Partition, int] = {}
        for stream in streams:
            hold = stream.durability.effective_hold()
            if hold is not None and stream.partition is not None:
                out[stream.partition] = min(hold, out.get(stream.partition, hold))
        return out
