"""The sampler's Kafka worker: poll Sample events, batch them for a few ms, generate in a thread, reply.

The poll loop never blocks on generation: decoded requests go into a queue that a generation task drains
into batches (`SamplerService.run_batch` in a worker thread). Poisoned events go to the dead-letter topic.
Offsets are committed only below the oldest request not yet answered (at-least-once; the gateway
deduplicates replies by request_id).
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
from bus_events import ContractError, EventType, decode_envelope, decode_payload, make_result
from bus_events import payloads as p
from bus_runtime.dead_letter import dead_letter_contract_error, send_to_dead_letter
from bus_runtime.health import heartbeating
from bus_runtime.kafka_io import ensure_topics, make_consumer, make_producer, publish
from bus_runtime.settings import BusSettings, open_object_store
from sampler_consumer.config import SamplerConfig
from sampler_consumer.offsets import OffsetTracker
from sampler_consumer.service import SampleJob, SamplerService

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 50
MAX_POLL_RECORDS = 512


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
        self.queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self.offsets = OffsetTracker()

    async def run(self, ready: asyncio.Event | None) -> None:
        generation = asyncio.create_task(self._generate_forever(), name="sampler-generation")
        if ready is not None:
            ready.set()
        try:
            while True:
                polled = await self.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
                for partition, records in polled.items():
                    for record in records:
                        await self._accept(partition, record)
                await self._commit()
                if generation.done():
                    generation.result()  # a crash of the generation loop surfaces here
        finally:
            generation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await generation

    # ------------------------------------------------------------------ intake
    async def _accept(self, partition: TopicPartition, record: ConsumerRecord) -> None:
        self.offsets.received(partition, record.offset)
        job = await self._decode(record)
        if job is None:
            self.offsets.done(partition, record.offset)
        else:
            self.queue.put_nowait(_Queued(partition, record.offset, job))

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
            await send_to_dead_letter(self.producer, self.settings, record, f"claim check unreadable: {exc}",
                                      "decode", env.request_id, env.model_id)
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

    # ------------------------------------------------------------------ generation
    async def _next_batch(self) -> list[_Queued]:
        batch = [await self.queue.get()]
        rows = batch[0].job.request.num_samples
        deadline = asyncio.get_running_loop().time() + self.config.batch_window_ms / 1000
        while rows < self.config.max_batch_rows:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(),
                                                                                               remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            batch.append(item)
            rows += item.job.request.num_samples
        return batch

    async def _generate_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            jobs = [item.job for item in batch]
            try:
                replies = await asyncio.to_thread(self.service.run_batch, jobs)
            except Exception as exc:  # a bug, not the request's fault: answer every request and carry on
                log.exception("sampling batch of %d requests failed", len(jobs))
                error = p.ErrorInfo(message=f"sampler failure: {exc}", category="server")
                replies = [make_result(job.env, error=error) for job in jobs]
            for env, result in replies:
                await publish(self.producer, self.settings.topics.replies, env, result, blob_store=self.objects,
                              claim_check_bytes=self.settings.claim_check_bytes)
            for item in batch:
                self.offsets.done(item.partition, item.offset)


async def run_sampler(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: SamplerConfig | None = None) -> None:
    """Serve the sampling topic until cancelled. `config` defaults to SamplerConfig.from_env()."""
    config = config or SamplerConfig.from_env()
    await ensure_topics(settings)
    objects = open_object_store(settings)
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
        await producer.stop()
