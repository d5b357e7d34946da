"""The trainer's Kafka worker: consume the training topic in a consumer group, decode, feed the engine, publish
its replies, and commit offsets only for finished events.

- Poison (bad msgpack, unknown schema version, missing field, wrong event type) goes to the dead-letter topic with
  its reason, its future (if known) is failed, and the worker carries on. A poisoned event that still names its
  model and seq_id voids that seq_id, so the model does not wait for it.
- Compute runs on the engine's compute thread, so this asyncio loop keeps fetching, heart-beating and committing
  during a long step. A partition with `max_scheduled_per_partition` events waiting for compute is paused (its
  other events stay on the broker) and resumed once it drains; out-of-order events held for a gap do not count,
  so a pause can never wait on an event it keeps from arriving.
- Offsets: see offsets.py. Revoked partitions are committed as far as finished, then forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from artifact_store import ObjectStore
from bus_events import TRAINING_EVENTS, ContractError, EventType, decode_envelope, decode_payload, make_event
from bus_events import payloads as p
from tinker_bus.dead_letter import dead_letter_contract_error
from tinker_bus.health import heartbeating
from tinker_bus.kafka_io import ensure_topics, make_consumer, make_producer, publish
from tinker_bus.settings import BusSettings
from trainer_consumer.backends import make_backend
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.config import TrainerConfig
from trainer_consumer.engine import TrainerEngine
from trainer_consumer.model_state import BusPosition
from trainer_consumer.offsets import OffsetTracker
from trainer_consumer.runtime import Runtime, Storage
from trainer_consumer.stream import Inbound, Reply

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
MAX_RECORDS_PER_POLL = 64


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: TrainerWorker, ready: asyncio.Event | None):
        self.worker, self.ready = worker, ready

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.commit(only=set(revoked))
        self.worker.offsets.forget(set(revoked))
        for tp in revoked:
            self.worker.inflight.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("trainer assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))
        if self.ready is not None:
            self.ready.set()


class TrainerWorker:
    def __init__(self, settings: BusSettings, runtime: Runtime, objects: ObjectStore):
        self.settings = settings
        self.config = runtime.config
        self.objects = objects
        self.engine = TrainerEngine(runtime, self._finish)
        self.offsets = OffsetTracker()
        self.inflight: dict[TopicPartition, dict[int, Inbound]] = defaultdict(dict)
        self.producer: AIOKafkaProducer = make_producer(settings)
        self.consumer: AIOKafkaConsumer = make_consumer(settings, group_id=settings.trainer_group)
        self._last_commit = 0.0

    async def run(self, ready: asyncio.Event | None = None) -> None:
        await self.producer.start()
        try:
            await self.consumer.start()
            try:
                self.consumer.subscribe([self.settings.topics.train], listener=_Rebalance(self, ready))
                self.engine.start()
                try:
                    await self._loop()
                finally:
                    await self.engine.stop()
                    with contextlib.suppress(Exception):
                        await self.commit()
            finally:
                await self.consumer.stop()
        finally:
            await self.producer.stop()

    async def _loop(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL)
            for tp, records in batches.items():
                for record in records:
                    await self._intake(tp, record)
            if self.engine.failure is not None:
                raise RuntimeError("the trainer engine failed") from self.engine.failure
            self._apply_backpressure()
            if time.monotonic() - self._last_commit >= self.config.commit_interval_s:
                await self.commit()

    # ------------------------------------------------------------------ intake
    async def _intake(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self.offsets.received(tp, record.offset)
        position = BusPosition(record.topic, record.partition, record.offset)
        try:
            env = decode_envelope(record.value or b"")
        except ContractError as exc:
            await self._dead_letter(tp, record, exc, "decode")
            return
        try:
            if env.type not in TRAINING_EVENTS:
                raise ContractError(f"{env.type.value} events do not belong on the training topic {record.topic}",
                                    env.request_id, env.model_id)
            if env.seq_id is not None and env.seq_id < 0:
                raise ContractError(f"seq_id must be >= 0, got {env.seq_id}", env.request_id, env.model_id)
            if env.payload_ref is not None:
                payload = await asyncio.to_thread(decode_payload, env, self.objects)
            else:
                payload = decode_payload(env)
        except ContractError as exc:
            await self._dead_letter(tp, record, exc, "validate", void=(env, position))
            return
        except Exception as exc:  # the claim check could not be fetched: this event cannot be applied
            await self._dead_letter(tp, record, ContractError(f"payload unreadable: {exc}", env.request_id,
                                                              env.model_id), "decode", void=(env, position))
            return
        inbound = Inbound(env, payload, position)
        self.inflight[tp][record.offset] = inbound
        await self.engine.submit(inbound)

    async def _dead_letter(self, tp: TopicPartition, record: ConsumerRecord, exc: ContractError, stage: str,
                           void: tuple | None = None) -> None:
        await dead_letter_contract_error(self.producer, self.settings, record, exc, stage)
        env, position = void if void is not None else (None, None)
        if env is None or env.seq_id is None or env.type == EventType.SEQ_VOID:
            self.offsets.finished(tp, record.offset)
            return
        # Its seq_id is burnt: void it in order (finishing the offset when the model gets there).
        void_env, body = make_event(EventType.SEQ_VOID, p.SeqVoid(reason=f"dead-lettered: {exc}"),
                                    model_id=env.model_id, request_id=env.request_id, seq_id=env.seq_id,
                                    tenant=env.tenant)
        inbound = Inbound(void_env, body, position, voided_type=env.type.value)
        self.inflight[tp][record.offset] = inbound
        await self.engine.submit(inbound)

    # ------------------------------------------------------------------ replies and offsets
    async def _finish(self, inbound: Inbound, replies: list[Reply]) -> None:
        for env, result in replies:
            await publish(self.producer, self.settings.topics.replies, env, result, blob_store=self.objects,
                          claim_check_bytes=self.settings.claim_check_bytes)
        if inbound.position is not None:
            tp = TopicPartition(inbound.position.topic, inbound.position.partition)
            self.inflight.get(tp, {}).pop(inbound.position.offset, None)
            self.offsets.finished(tp, inbound.position.offset)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        self._last_commit = time.monotonic()
        offsets = self.offsets.to_commit(only)
        if offsets:
            await self.consumer.commit(offsets)
            self.offsets.committed(offsets)

    def _apply_backpressure(self) -> None:
        paused = self.consumer.paused()
        for tp in self.consumer.assignment():
            busy = sum(1 for inbound in self.inflight.get(tp, {}).values() if inbound.scheduled)
            if busy >= self.config.max_scheduled_per_partition and tp not in paused:
                log.debug("pausing %s: %d events wait for compute", tp, busy)
                self.consumer.pause(tp)
            elif busy < self.config.max_scheduled_per_partition and tp in paused:
                self.consumer.resume(tp)


async def run_trainer(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: TrainerConfig | None = None, backend: TrainingBackend | None = None) -> None:
    """Run the trainer until cancelled. `ready` is set once the consumer group has assigned partitions."""
    config = config or TrainerConfig.from_env()
    objects = ObjectStore.from_settings(settings)
    await asyncio.to_thread(objects.ensure_bucket)
    await ensure_topics(settings)
    runtime = Runtime(backend or make_backend(config, settings.device), Storage.on(objects), config,
                      settings.base_models)
    async with heartbeating(objects, "trainer"):
        await TrainerWorker(settings, runtime, objects).run(ready)
