"""The trainer's Kafka worker: consume the training topic in a consumer group, decode, feed the engine, publish
its replies, and commit offsets only as far as the models' state is durable.

- Poison (bad msgpack, unknown schema version, missing field, wrong event type) goes to the dead-letter topic with
  its reason, its future (if known) is failed, and the worker carries on. A poisoned event that still names its
  model and seq_id voids that seq_id, so the model does not wait for it (intake.py).
- Compute runs on the engine's compute thread, so this asyncio loop keeps fetching, heart-beating and committing
  during a long step. A partition with `max_scheduled_per_partition` events waiting for compute is paused (its
  other events stay on the broker) and resumed once it drains; out-of-order events held for a gap do not count,
  so a pause can never wait on an event it keeps from arriving.
- Offsets (offsets.py, durability.py): a partition's commit stops at its lowest unfinished event and at the lowest
  event some model of it still needs re-read after a crash (not yet covered by that model's snapshot). A trainer
  killed at any moment therefore loses nothing: its successor restores each model from its snapshot and re-applies
  the rest from the log (docs/recovery.md).
- Rebalance: revoked partitions are released (running steps finish, models snapshotted where their gradient
  window allows), committed, then their models are dropped; the next owner restores them lazily.
- The broker may go away for a while (restart, failover): fetch and commit errors are logged and retried, and a
  reply is re-published until `publish_retry_s`; only then does the worker stop (and its successor replays).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from artifact_store import ObjectStore
from bus_events import Reply
from bus_runtime.dead_letter import dead_letter_contract_error
from bus_runtime.doors import EARLY_KEPT, BusRecord, DoorBell, DoorServer, reply_door_of
from bus_runtime.fetch_pacing import FetchPacer
from bus_runtime.health import heartbeating
from bus_runtime.kafka_io import RETRY_DELAY_S, ensure_topics, make_consumer, make_producer, publish_with_retry
from bus_runtime.metrics import serve_metrics
from bus_runtime.offsets import OffsetTracker
from bus_runtime.records import SignatureCheck
from bus_runtime.settings import BusSettings, open_object_store
from trainer_consumer.backends import make_backend
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.config import TrainerConfig
from trainer_consumer.engine import TrainerEngine
from trainer_consumer.handed import HandedMismatch, HandedRecords
from trainer_consumer.inbound import BusPosition, Inbound
from trainer_consumer.intake import Poisoned, decode_training_record
from trainer_consumer.metrics import TrainerMetrics
from trainer_consumer.runtime import Runtime, Storage

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
MAX_RECORDS_PER_POLL = 64
# Fetch fast (settings.fetch_busy_wait_ms) this long after the last request or reply: a client that just called or
# just got its answer usually calls again (the next step, the next forward), and on Tansu each idle fetch wait
# delays that call (fetch_pacing.py). From the last reply, not only the last request: a step may outlast this.
SESSION_FAST_S = 2.0


def _preview_key(record: BusRecord) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    return record.value, tuple((name, value) for name, value in record.headers)


def _partitions(tps: set[TopicPartition]) -> set[tuple[str, int]]:
    return {(tp.topic, tp.partition) for tp in tps}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: TrainerWorker, ready: asyncio.Event | None):
        self.worker, self.ready = worker, ready

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.hand_over(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("trainer assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        self.worker.owned |= set(assigned)
        if self.ready is not None:
            self.ready.set()


class TrainerWorker:
    def __init__(self, settings: BusSettings, runtime: Runtime, objects: ObjectStore):
        self.settings = settings
        self.config = runtime.config
        self.objects = objects
        self.engine = TrainerEngine(runtime, self._finish)
        self.offsets = OffsetTracker()  # the one record of unfinished offsets (the engine knows what waits for compute)
        self.producer: AIOKafkaProducer = make_producer(settings)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=settings.trainer_group)
        # fetch_pacing.py: the short wait for a while after a sign of a client. With an intake door, only a request
        # the door did not bring is one (a direct producer, a gateway that cannot reach the door): what gateways
        # hand over needs no short wait, and every empty fetch of one is Python on this loop, which the compute
        # thread waits for (the GIL; ~12 % of a core at 2 ms in a CPU profile of a step loop).
        self.pacer = FetchPacer(settings.fetch_max_wait_ms, settings.fetch_busy_wait_ms, SESSION_FAST_S)
        # Partitions this worker may feed to the engine. A revoke removes them before anything else, so a record
        # still being decoded when its partition goes away is dropped (its next owner reads it again).
        self.owned: set[TopicPartition] = set()
        self.tenant_keys = settings.tenant_keys  # requests must prove their tenant (bus_events/signing.py)
        self._last_commit = 0.0
        self.metrics = TrainerMetrics()
        self.bell = DoorBell()  # rings the asking gateways' reply doors
        host = runtime.config.intake_door_host
        self.intake_door = DoorServer(host, self._take_handed, self._preview) if host else None
        self.handed = HandedRecords()
        # Requests decoded from their announced bytes while the broker wrote them, by value and headers (what the
        # decode reads; a fetched copy of the same record finds its entry too); at most EARLY_KEPT: an announced
        # request whose produce failed stays until pushed out.
        self._previews: dict[tuple[bytes, tuple[tuple[str, bytes], ...]], asyncio.Task[Inbound | Poisoned]] = {}
        self.previewed = 0  # requests taken in decoded already
        self._intake_lock = asyncio.Lock()  # a partition's records enter the engine one at a time, in log order

    def health(self) -> dict:
        engine = self.engine
        # queued / paused_partitions: the gateway's try_again queue state and the dashboard read them
        return {"partitions": sorted(tp.partition for tp in self.owned), "models": len(engine.streams),
                "healthy": engine.maintenance_error is None and engine.failure is None,
                "problem": engine.maintenance_error or (repr(engine.failure) if engine.failure else None),
                "maintenance_restarts": engine.maintenance_restarts, "offloaded": engine.residency.offloads,
                "queued": sum(engine.scheduled().values()),
                "paused_partitions": sorted(tp.partition for tp in self.consumer.paused()),
                # where gateways hand this trainer the requests of `partitions` (bus_runtime/doors.py)
                "intake_door": door.spec if self.intake_door and (door := self.intake_door.door) else None,
                "handed": {"taken": self.handed.taken, "passed": self.handed.passed, "previewed": self.previewed},
                "fetch_wait_ms": self.pacer.wait_ms()}

    async def run(self, ready: asyncio.Event | None = None) -> None:
        await self._preload()
        await self.producer.start()
        if self.intake_door is not None:
            await self.intake_door.start()
        try:
            await self.consumer.start()
            try:
                self.consumer.subscribe([self.settings.topics.train], listener=_Rebalance(self, ready))
                self.engine.start()
                try:
                    await self._loop()
                finally:
                    await self._stop_engine()
            finally:
                await self.consumer.stop()
        finally:
            if self.intake_door is not None:
                await self.intake_door.stop()
            for preview in self._previews.values():
                preview.cancel()
            await self.bell.close()
            await self.producer.stop()

    async def _preload(self) -> None:
        """Load the served base models before joining the group: partitions handed to this trainer (a restart,
        a rebalance) then restore at once instead of waiting for a model load."""
        runtime = self.engine.runtime
        for name in runtime.base_models or ():
            try:
                await runtime.compute(runtime.backend.base_model_info, name)
            except Exception as exc:  # create_model of it will say why; the other base models still serve
                log.error("base model %s could not be loaded: %s", name, exc)

    async def _stop_engine(self) -> None:
        """Graceful stop: finish running steps, snapshot, commit what is durable, then cancel the rest."""
        try:
            if self.engine.failure is None:
                await self.engine.release()
            await self.commit()
        except Exception:
            log.exception("final snapshots / commit failed; the next owner replays from the last commit")
        finally:
            await self.engine.stop()

    async def _loop(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL)
            except KafkaError as exc:  # the broker is away: aiokafka reconnects, we keep asking
                log.warning("fetch failed (%s); retrying", exc)
                await asyncio.sleep(RETRY_DELAY_S[0])
                continue
            if batches and self.intake_door is None:
                self.pacer.busy()
            self.pacer.apply(self.consumer)
            for tp, records in batches.items():
                for record in records:
                    async with self._intake_lock:
                        await self._intake_fetched(tp, record)
            if self.engine.failure is not None:
                raise RuntimeError("the trainer engine failed") from self.engine.failure
            self._apply_backpressure()
            self.metrics.sample(self.consumer, self.offsets, self.engine.scheduled(), len(self.engine.streams))
            if time.monotonic() - self._last_commit >= self.config.commit_interval_s:
                await self.commit()

    # ------------------------------------------------------------------ intake
    async def _intake_fetched(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        try:
            if self.handed.fetched(tp.topic, tp.partition, record.offset, record.value):
                return  # taken from the intake door already
        except HandedMismatch as exc:  # no final snapshot of what it may have changed: the successor replays
            self.engine.failure = exc
            raise
        if self.intake_door is not None:
            self.pacer.busy()  # a request the door did not bring: its client's next one comes by the fetch too
        await self._intake(BusRecord(record.value or b"", list(record.headers or ()), tp.topic, tp.partition,
                                     record.offset, record.key))

    async def _take_handed(self, record: BusRecord) -> None:
        """A request a gateway handed through the intake door once the broker had it: taken in now if it is the
        next record its partition owes this trainer (handed.py), else left to the fetch."""
        tp = TopicPartition(record.topic, record.partition)
        async with self._intake_lock:
            owed = self.offsets.partition(tp)
            room = self.engine.scheduled().get((tp.topic, tp.partition), 0) < self.config.max_scheduled_per_partition
            readable = tp in self.owned and tp not in self.consumer.paused() and room
            if self.handed.take(record, owed.next_offset if owed is not None and readable else None):
                await self._intake(record)

    def _preview(self, record: BusRecord) -> None:
        """An announced request (not acknowledged yet): decode it now, so its ack finds that done."""
        if len(self._previews) >= EARLY_KEPT:
            self._previews.pop(next(iter(self._previews))).cancel()
        task = asyncio.create_task(self._decode(record), name="trainer-preview")
        # An error (an unreadable claim check) is raised where the request is taken in; one never taken is dropped.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._previews[_preview_key(record)] = task

    async def _decode(self, record: BusRecord) -> Inbound | Poisoned:
        position = BusPosition(record.topic, record.partition, record.offset)
        verify = SignatureCheck(self.tenant_keys, record.value, record.headers) if self.tenant_keys else None
        return await decode_training_record(record.value, position, self.objects, verify)

    async def _intake(self, record: BusRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        if tp not in self.owned:
            return
        self.offsets.received(tp, record.offset)
        preview = self._previews.pop(_preview_key(record), None)
        early = await preview if preview is not None else None
        if isinstance(early, Inbound):
            self.previewed += 1
            decoded: Inbound | Poisoned = dataclasses.replace(early, position=BusPosition(
                record.topic, record.partition, record.offset))
        else:  # poisoned (its dead letter names the offset) or not previewed: decoded here, at its position
            decoded = await self._decode(record)
        if tp not in self.owned:  # revoked while the claim check was fetched
            return
        if isinstance(decoded, Poisoned):
            await dead_letter_contract_error(self.producer, self.settings, record, decoded.error, decoded.stage)
            self.metrics.dead_letter(decoded.stage)
            if decoded.void is None:
                self.offsets.finished(tp, record.offset)
                return
            decoded = decoded.void  # its seq_id is burnt: void it in order (finished when the model gets there)
        decoded.door = reply_door_of(record.headers)
        self.metrics.submitted(decoded)
        await self.engine.submit(decoded)

    # ------------------------------------------------------------------ replies and offsets
    async def _finish(self, inbound: Inbound, replies: list[Reply]) -> None:
        self.metrics.finished(inbound, replies)
        if replies and self.intake_door is None:
            self.pacer.busy()
            self.pacer.apply(self.consumer)
        for env, result in replies:
            sent = await publish_with_retry(self.producer, self.settings.topics.replies, env, result,
                                            retry_s=self.config.publish_retry_s, blob_store=self.objects,
                                            claim_check_bytes=self.settings.claim_check_bytes,
                                            signing_key=self.settings.reply_signing_key)
            self.bell.ring(inbound.door, sent)  # acknowledged: in the log, so it may go
        if inbound.position is not None:
            tp = TopicPartition(inbound.position.topic, inbound.position.partition)
            self.offsets.finished(tp, inbound.position.offset)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        holds = {TopicPartition(topic, partition): offset
                 for (topic, partition), offset in self.engine.holds().items()}
        offsets = self.offsets.to_commit(only, holds)
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # rebalancing, broker away: the next commit carries the same offsets
            log.warning("offset commit failed (%s); retried with the next one", exc)
            return
        self.offsets.committed(offsets)
        self.metrics.committed()

    async def hand_over(self, revoked: set[TopicPartition]) -> None:
        """Revoked partitions: stop feeding them, let their models settle and snapshot, commit, forget."""
        self.owned -= revoked
        partitions = _partitions(revoked)
        await self.engine.release(partitions)
        await self.commit(only=revoked)
        await self.engine.drop(partitions)
        self.offsets.forget(revoked)
        self.handed.forget(partitions)

    def _apply_backpressure(self) -> None:
        paused = self.consumer.paused()
        scheduled = self.engine.scheduled()
        for tp in self.consumer.assignment():
            busy = scheduled.get((tp.topic, tp.partition), 0)
            if busy >= self.config.max_scheduled_per_partition and tp not in paused:
                log.debug("pausing %s: %d events wait for compute", tp, busy)
                self.consumer.pause(tp)
            elif busy < self.config.max_scheduled_per_partition and tp in paused:
                self.consumer.resume(tp)


async def run_trainer(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: TrainerConfig | None = None, backend: TrainingBackend | None = None) -> None:
    """Run the trainer until cancelled. `ready` is set once the consumer group has assigned partitions."""
    config = config or TrainerConfig.from_env()
    if config.torch_threads > 0:
        import torch

        torch.set_num_threads(config.torch_threads)
    objects = open_object_store(settings)
    await asyncio.to_thread(objects.ensure_bucket)
    await ensure_topics(settings)
    runtime = Runtime(backend or make_backend(config, settings.device), Storage.on(objects), config,
                      settings.base_models)
    worker = TrainerWorker(settings, runtime, objects)
    metrics = serve_metrics(worker.metrics.registry, config.metrics_port)
    try:
        async with heartbeating(objects, "trainer", worker.health, metrics_url=metrics.url):
            await worker.run(ready)  # a cancel stops it gracefully (TrainerWorker._stop_engine)
    finally:
        metrics.close()
