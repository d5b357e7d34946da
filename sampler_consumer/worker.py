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
import functools
import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from artifact_store import ObjectStore
from bus_events import Envelope, EventType, Reply
from bus_events import payloads as p
from bus_runtime.dead_letter import dead_letter_contract_error
from bus_runtime.health import heartbeating
from bus_runtime.kafka_io import ensure_topics, make_consumer, make_producer, publish_with_retry
from bus_runtime.metrics import serve_metrics
from bus_runtime.offsets import OffsetTracker
from bus_runtime.records import Poisoned, SignatureCheck, decode_record
from bus_runtime.settings import BusSettings, open_object_store
from sampler_consumer.cancellation import Cancellations
from sampler_consumer.config import SamplerConfig
from sampler_consumer.metrics import SamplerMetrics
from sampler_consumer.requests import describe
from sampler_consumer.service import Prepared, SampleJob, SamplerService
from sampler_consumer.streaming import DeltaPublisher

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 50
MAX_POLL_RECORDS = 512
MAX_PUBLISHING = 256  # replies being sent at once


@dataclass
class _Queued:
    partition: TopicPartition
    offset: int
    job: SampleJob
    arrived: float = field(default_factory=time.monotonic)
    base_model: str = ""  # known once prepared


class _SamplerWorker:
    def __init__(self, settings: BusSettings, config: SamplerConfig, service: SamplerService,
                 producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, objects: ObjectStore,
                 metrics: SamplerMetrics) -> None:
        self.settings, self.config, self.service, self.metrics = settings, config, service, metrics
        self.tenant_keys = settings.tenant_keys  # requests must prove their tenant (bus_events/signing.py)
        self.producer, self.consumer, self.objects = producer, consumer, objects
        self.intake: asyncio.Queue[_Queued] = asyncio.Queue()
        self.replies: asyncio.Queue[tuple[_Queued, Reply]] = asyncio.Queue()
        self.offsets = OffsetTracker()
        self.cancellations = Cancellations(settings.result_ttl_s)
        self.deltas = DeltaPublisher(service.core, producer, settings, config.stream_interval_s)

    async def run(self, ready: asyncio.Event | None) -> None:
        tasks = [asyncio.create_task(self._intake_forever(), name="sampler-intake"),
                 asyncio.create_task(self._publish_forever(), name="sampler-publish"),
                 asyncio.create_task(self.deltas.run(), name="sampler-deltas")]
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
        decoded = await self._decode(record)
        if isinstance(decoded, SampleJob):
            self.intake.put_nowait(_Queued(partition, record.offset, decoded))
            return
        if decoded is not None:  # a cancel: remembered until its request is dequeued
            self.cancellations.add(*decoded)
        self.offsets.finished(partition, record.offset)

    async def _decode(self, record: ConsumerRecord) -> SampleJob | tuple[Envelope, p.Cancel] | None:
        """The record's request or cancel, or None once it has been dead-lettered."""
        verify = SignatureCheck(self.tenant_keys, record.value, record.headers) if self.tenant_keys else None
        decoded = await decode_record(record.value, self.objects, {EventType.SAMPLE, EventType.CANCEL},
                                      check=verify)
        if isinstance(decoded, Poisoned):
            await dead_letter_contract_error(self.producer, self.settings, record, decoded.error, decoded.stage)
            self.metrics.failure("dead_letter")
            return None
        if isinstance(decoded.payload, p.Cancel):
            return decoded.env, decoded.payload
        assert isinstance(decoded.payload, p.Sample)
        return SampleJob(decoded.env, decoded.payload)

    def _cancelled(self, item: _Queued) -> bool:
        """Answer `item` as cancelled if a cancel for it came in; True if so."""
        reply = self.cancellations.take(item.job.env)
        if reply is not None:
            self.replies.put_nowait((item, reply))
        return reply is not None

    async def _commit(self) -> None:
        positions = self.offsets.to_commit()
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
            batch = [item for item in batch if not self._cancelled(item)]
            if not batch:
                continue
            try:
                prepared = await asyncio.to_thread(self.service.prepare, [item.job for item in batch])
            except Exception as exc:  # a bug, not the requests' fault: answer every one and carry on
                log.exception("preparing %d sample requests failed", len(batch))
                error = p.ErrorInfo(message=f"sampler failure: {describe(exc)}", category="server")
                prepared = [Prepared(item.job, error=error) for item in batch]
            for item, ready in zip(batch, prepared, strict=True):
                item.base_model = ready.base_model
                if self._cancelled(item):  # cancelled while its session and adapter were read
                    continue
                if item.job.request.stream and ready.error is None:
                    self.deltas.watch(item.job.env, ready.pieces)
                self.service.submit(ready, functools.partial(self._reply_threadsafe, loop, item))

    # ------------------------------------------------------------------ replies
    def _reply_threadsafe(self, loop: asyncio.AbstractEventLoop, item: _Queued, reply: Reply) -> None:
        """Called on the engine thread: the reply joins the publish queue on the event loop's thread."""
        loop.call_soon_threadsafe(self._replied, item, reply)

    def _replied(self, item: _Queued, reply: Reply) -> None:
        self.deltas.forget(item.job.env.request_id)
        self.replies.put_nowait((item, reply))

    async def _publish_forever(self) -> None:
        sending: set[asyncio.Task] = set()
        while True:
            item, reply = await self.replies.get()
            for task in [task for task in sending if task.done()]:
                task.result()  # a reply that could not be published within publish_retry_s stops the worker
                sending.discard(task)
            while len(sending) >= MAX_PUBLISHING:
                _, sending = await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
            sending.add(asyncio.create_task(self._publish(item, reply)))

    async def _publish(self, item: _Queued, reply: Reply) -> None:
        env, result = reply
        # Raises once the broker stayed away for publish_retry_s: nothing is committed past this request, so the
        # sampler that takes over reads it again and answers it.
        await publish_with_retry(self.producer, self.settings.topics.replies, env, result,
                                 retry_s=self.config.publish_retry_s, blob_store=self.objects,
                                 claim_check_bytes=self.settings.claim_check_bytes,
                                 signing_key=self.settings.reply_signing_key)
        self.offsets.finished(item.partition, item.offset)
        error = result.error
        self.metrics.request_done(item.base_model, ok=error is None, seconds=time.monotonic() - item.arrived)
        if error is not None:
            self.metrics.failure("user" if error.category == "user" else "server")


async def run_sampler(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: SamplerConfig | None = None) -> None:
    """Serve the sampling topic until cancelled. `config` defaults to SamplerConfig.from_env()."""
    config = config or SamplerConfig.from_env()
    await ensure_topics(settings)
    objects = open_object_store(settings)
    await asyncio.to_thread(objects.ensure_bucket)
    metrics = SamplerMetrics(settings.base_models)
    service = SamplerService(settings, config, objects, metrics)
    producer = make_producer(settings)
    consumer = make_consumer(settings, settings.topics.sample, group_id=settings.sampler_group)
    await producer.start()
    try:
        await consumer.start()
        try:
            server = serve_metrics(metrics.registry, config.metrics_port)
            try:
                async with heartbeating(objects, "sampler", metrics.health, metrics_url=server.url):
                    await _SamplerWorker(settings, config, service, producer, consumer, objects, metrics).run(ready)
            finally:
                server.close()
        finally:
            await consumer.stop()
    finally:
        await asyncio.to_thread(service.close)
        await producer.stop()
