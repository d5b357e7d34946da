"""The sampler's Kafka worker: a thin client of the engine core.

The poll loop never blocks on sampling: decoded requests go to an intake task that prepares them in batches
(S3 lookups in a worker thread) and hands them to the engine thread; each answer comes back through
`loop.call_soon_threadsafe` into a reply queue that a publisher task drains, publishing replies concurrently.
Poisoned events go to the dead-letter topic. Offsets are committed only below the oldest request not yet
answered (at-least-once; the gateway deduplicates replies by request_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from artifact_store import ObjectStore
from bus_events import ContractError, EventType, decode_envelope, decode_payload
from bus_events import payloads as p
from sampler_consumer.config import SamplerConfig
from sampler_consumer.offsets import OffsetTracker
from sampler_consumer.requests import describe
from sampler_consumer.service import Prepared, Reply, SampleJob, SamplerService
from tinker_bus.dead_letter import dead_letter_contract_error, send_to_dead_letter
from tinker_bus.health import heartbeating
from tinker_bus.kafka_io import ensure_topics, make_consumer, make_producer, publish
from tinker_bus.settings import BusSettings

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 50
MAX_POLL_RECORDS = 512
MAX_PUBLISHING = 256  # replies being sent at once


@dataclass
class _Queued:
    partition: TopicPartition
    offset: int
    job: SampleJob


class _SamplerWorker:
    def __init__(self, settings: BusSettings, config: SamplerConfig, service: SamplerService,
                 producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, objects: ObjectStore) -> None:
        self.settings, self.config, self.service = settings, config, service
        self.producer, self.consumer, self.objects = producer, consumer, objects
        self.intake: asyncio.Queue[_Queued] = asyncio.Queue()
        self.replies: asyncio.Queue[tuple[_Queued, Reply]] = asyncio.Queue()
        self.offsets = OffsetTracker()

    async def run(self, ready: asyncio.Event | None) -> None:
        tasks = [asyncio.create_task(self._intake_forever(), name="sampler-intake"),
                 asyncio.create_task(self._publish_forever(), name="sampler-publish")]
        if ready is not None:
            ready.set()
        try:
            while True:
                polled = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
                for partition, records in polled.items():
                    for record in records:
                        await self._accept(partition, record)
                await self._commit()
                for task in tasks:
                    if task.done():
                        task.result()  # a crash of a helper task surfaces here
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------------ intake
    async def _accept(self, partition: TopicPartition, record: ConsumerRecord) -> None:
        self.offsets.received(partition, record.offset)
        job = await self._decode(record)
        if job is None:
            self.offsets.done(partition, record.offset)
        else:
            self.intake.put_nowait(_Queued(partition, record.offset, job))

    async def _decode(self, record: ConsumerRecord) -> SampleJob | None:
        """The record's request, or None once it has been dead-lettered."""
        try:
            env = decode_envelope(record.value)
        except ContractError as exc:
            await dead_letter_contract_error(self.producer, self.settings, record, exc, "decode")
            return None
        if env.type != EventType.SAMPLE:
            await send_to_dead_letter(self.producer, self.settings, record,
                                      f"{env.type.value} event on the sampling topic (only sample belongs here)",
                                      "validate", env.request_id, env.model_id)
            return None
        try:
            if env.payload_ref is not None:
                payload = await asyncio.to_thread(decode_payload, env, self.objects)
            else:
                payload = decode_payload(env)
        except ContractError as exc:
            await dead_letter_contract_error(self.producer, self.settings, record, exc, "validate")
            return None
        except Exception as exc:  # the claim-checked payload could not be fetched
            await send_to_dead_letter(self.producer, self.settings, record,
                                      f"claim check unreadable: {describe(exc)}", "decode", env.request_id,
                                      env.model_id)
            return None
        return SampleJob(env, payload)

    async def _commit(self) -> None:
        positions = self.offsets.commit_positions()
        if not positions:
            return
        try:
            await self.consumer.commit(positions)
        except KafkaError as exc:  # e.g. a rebalance took the partition: its new owner re-reads from there
            log.warning("offset commit failed: %s", exc)
        else:
            self.offsets.committed(positions)

    async def _intake_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.intake.get()]
            while len(batch) < self.config.intake_batch and not self.intake.empty():
                batch.append(self.intake.get_nowait())
            try:
                prepared = await asyncio.to_thread(self.service.prepare, [item.job for item in batch])
            except Exception as exc:  # a bug, not the requests' fault: answer every one and carry on
                log.exception("preparing %d sample requests failed", len(batch))
                error = p.ErrorInfo(message=f"sampler failure: {describe(exc)}", category="server")
                prepared = [Prepared(item.job, error=error) for item in batch]
            for item, ready in zip(batch, prepared, strict=True):
                self.service.submit(ready, lambda reply, item=item: loop.call_soon_threadsafe(
                    self.replies.put_nowait, (item, reply)))

    # ------------------------------------------------------------------ replies
    async def _publish_forever(self) -> None:
        sending: set[asyncio.Task] = set()
        while True:
            item, reply = await self.replies.get()
            sending = {task for task in sending if not task.done()}
            while len(sending) >= MAX_PUBLISHING:
                _, sending = await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
            sending.add(asyncio.create_task(self._publish(item, reply)))

    async def _publish(self, item: _Queued, reply: Reply) -> None:
        env, result = reply
        try:
            await publish(self.producer, self.settings.topics.replies, env, result, blob_store=self.objects,
                          claim_check_bytes=self.settings.claim_check_bytes)
        except Exception:  # not committed: the request is read again after a restart and answered then
            log.exception("publishing the reply to %s failed", env.request_id)
            return
        self.offsets.done(item.partition, item.offset)


async def run_sampler(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: SamplerConfig | None = None) -> None:
    """Serve the sampling topic until cancelled. `config` defaults to SamplerConfig.from_env()."""
    config = config or SamplerConfig.from_env()
    await ensure_topics(settings)
    objects = ObjectStore.from_settings(settings)
    await asyncio.to_thread(objects.ensure_bucket)
    service = SamplerService(settings, config, objects)
    producer = make_producer(settings)
    consumer = make_consumer(settings, settings.topics.sample, group_id=settings.sampler_group)
    await producer.start()
    try:
        await consumer.start()
        try:
            async with heartbeating(objects, "sampler"):
                await _SamplerWorker(settings, config, service, producer, consumer, objects).run(ready)
        finally:
            await consumer.stop()
    finally:
        await asyncio.to_thread(service.close)
        await producer.stop()
