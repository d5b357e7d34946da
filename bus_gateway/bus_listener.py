"""Reads every partition of the reply topic (results) and of the request topics (who asked what) into the
future table, without a consumer group, so every gateway instance sees everything.

Start position: per partition, the latest stored mark older than the result TTL window (listener_marks.py: what
an earlier listener of this bus read, with its time), else offsets_for_times(now - result TTL); never `latest` /
end offsets (local-infra.md 2.1: Tansu answers ListOffsets(LATEST) wrongly). Tansu also answers offsets_for_times
with offset 0 when no record is that new, so records older than the window are skipped by their timestamp as well.
The marks are saved every MARKS_SAVE_S and at stop.

Catching up: until every partition's position has reached the fetch high-watermark (what was on the bus when
this gateway started, at least), a request id the table lacks may still be on its way: `caught_up` is False,
retrieve_future answers try_again instead of "unknown", and /healthz says the gateway is not ready yet.

Identity (docs/events.md "Event identity"): with tenant keys, a request record must be signed by its tenant; with
the workers' reply key, a result must be signed with it. Anything else is dropped (logged, counted in
`unverified` per topic): a producer that can write a topic cannot answer, pre-empt or shadow another's future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from artifact_store import ObjectStore
from bus_events import UNANSWERED_EVENTS, Envelope, EventType
from bus_events import payloads as p
from bus_gateway.futures import Future, FutureTable
from bus_gateway.listener_marks import ListenerMarks
from bus_gateway.streams import DeltaRouter
from bus_runtime.doors import BusRecord
from bus_runtime.fetch_pacing import FetchPacer
from bus_runtime.kafka_io import make_consumer
from bus_runtime.records import Poisoned, ReplyCheck, SignatureCheck, UnverifiedEvent, decode_record
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)

REQUEST_EVENTS = frozenset(EventType) - UNANSWERED_EVENTS - {EventType.RESULT, EventType.SAMPLE_DELTA,
                                                               EventType.DEAD_LETTER}
REPLY_EVENTS = frozenset({EventType.RESULT, EventType.SAMPLE_DELTA})
# seq_voids and cancels are read on the request topics (they are no poison) but promise no result: nothing to track.
READ_ON_REQUEST_TOPICS = REQUEST_EVENTS | UNANSWERED_EVENTS
MARKS_SAVE_S = 30.0
# Fetch fast while a request POSTed here awaits its result, for at most this long after the last one: a request whose
# result never comes (no worker) must not keep the listener polling fast; a longer call then waits one idle fetch more.
PENDING_FAST_S = 30.0
DOOR = "reply door"  # where records came from, besides the topics (`unverified` counts per source)


class BusListener:
    def __init__(self, settings: BusSettings, table: FutureTable, blob_store: ObjectStore,
                 deltas: DeltaRouter | None = None) -> None:
        self.settings = settings
        self.table = table
        self.blob_store = blob_store
        self.deltas = deltas if deltas is not None else DeltaRouter()
        self.marks = ListenerMarks(blob_store, settings.topics.prefix, settings.result_ttl_s)
        self.tenant_keys = settings.tenant_keys
        self.unverified: Counter[str] = Counter()  # records dropped for their signature, per topic (or DOOR)
        self._marks_saved = time.monotonic()
        self.consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self.records_seen = 0
        self.direct_results = 0  # results resolved from the reply door before their fetch
        self._behind: set[TopicPartition] = set()  # partitions not yet read up to their high-watermark
        self._caught_up = asyncio.Event()
        self.pacer = FetchPacer(settings.fetch_max_wait_ms, settings.fetch_busy_wait_ms, PENDING_FAST_S)
        table.on_local_pending.append(self._expecting)
        table.on_resolve.append(self._resolved)

    def _expecting(self, _fut: Future) -> None:
        self.pacer.busy()
        self._pace()

    def _resolved(self, _fut: Future) -> None:
        if self.table.local_pending == 0:
            self.pacer.idle()
            self._pace()

    def _pace(self) -> None:
        if self.consumer is not None:
            self.pacer.apply(self.consumer)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def _check_caught_up(self) -> None:
        assert self.consumer is not None
        for tp in list(self._behind):
            highwater = self.consumer.highwater(tp)
            if highwater is not None and await self.consumer.position(tp) >= highwater:
                self._behind.discard(tp)
        if not self._behind and not self._caught_up.is_set():
            log.info("bus listener caught up (%d records read)", self.records_seen)
            self._caught_up.set()

    def _partitions(self, topic: str) -> list[TopicPartition]:
        assert self.consumer is not None
        known = self.consumer.partitions_for_topic(topic)
        count = self.settings.topics.all()[topic]
        return [TopicPartition(topic, n) for n in sorted(known or range(count))]

    async def start(self) -> None:
        topics = self.settings.topics
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        tps = [tp for t in (topics.replies, topics.train, topics.sample) for tp in self._partitions(t)]
        self.consumer.assign(tps)
        await asyncio.to_thread(self.marks.load)
        now_ms = int(time.time() * 1000)
        marked = {tp: self.marks.start_offset(tp, now_ms) for tp in tps}
        unmarked = [tp for tp, offset in marked.items() if offset is None]
        window_start_ms = now_ms - int(self.settings.result_ttl_s * 1000)
        offsets = await self.consumer.offsets_for_times({tp: window_start_ms for tp in unmarked}) if unmarked else {}
        for tp in tps:
            found = offsets.get(tp)
            start = marked[tp] if marked[tp] is not None else (found.offset if found is not None else 0)
            self.consumer.seek(tp, start)
        log.info("bus listener starts at %d marked position(s), %d by time", len(tps) - len(unmarked), len(unmarked))
        self._behind = set(tps)
        self._task = asyncio.create_task(self._run(), name="gateway-bus-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.consumer is not None:
            await self.consumer.stop()
        if self.marks.dirty:
            try:
                await asyncio.to_thread(self.marks.save)
            except Exception:  # the next gateway then reads a little more of the log, nothing else
                log.exception("saving the bus listener's marks failed")

    async def _save_marks(self) -> None:
        if self.marks.dirty and time.monotonic() - self._marks_saved >= MARKS_SAVE_S:
            self._marks_saved = time.monotonic()
            try:
                await asyncio.to_thread(self.marks.save)
            except Exception:
                log.exception("saving the bus listener's marks failed; retried later")

    async def _run(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=500, max_records=2000)
            except asyncio.CancelledError:
                raise
            except Exception:  # a broker hiccup must not kill the listener: every retrieve_future depends on it
                log.exception("bus listener fetch failed; retrying")
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    await self.handle(record)
            self._pace()  # PENDING_FAST_S may have run out
            if self._behind:
                await self._check_caught_up()
            await self._save_marks()

    async def handle(self, record: ConsumerRecord) -> None:
        self.records_seen += 1
        now = time.time()
        self.marks.note(TopicPartition(record.topic, record.partition), record.timestamp, record.offset,
                        int(now * 1000))
        if record.timestamp / 1000 < now - self.settings.result_ttl_s:
            return
        # Results only from the reply topic and requests only from the request topics: each topic's check is
        # the one for what belongs on it.
        replies = record.topic == self.settings.topics.replies
        decoded = await decode_record(record.value, self.blob_store,
                                      REPLY_EVENTS if replies else READ_ON_REQUEST_TOPICS,
                                      envelope_only=READ_ON_REQUEST_TOPICS, check=self._check(record))
        if isinstance(decoded, Poisoned) and isinstance(decoded.error, UnverifiedEvent):
            self.unverified[record.topic] += 1
            log.warning("bus listener drops %s[%s]@%s: %s", record.topic, record.partition, record.offset,
                        decoded.error)
            return
        if isinstance(decoded, Poisoned):
            # Workers dead-letter poison on their topics; the gateway only reads, so it just skips it.
            log.warning("bus listener skips %s[%s]@%s: %s", record.topic, record.partition, record.offset,
                        decoded.error)
            return
        env = decoded.env
        if isinstance(decoded.payload, p.Result):
            self._resolve(env, decoded.payload)
        elif isinstance(decoded.payload, p.SampleDelta):
            self.deltas.deliver(env.request_id, decoded.payload)
        elif env.type in REQUEST_EVENTS:
            self.table.add(Future(env.request_id, env.tenant, env.type.value, env.model_id, env.seq_id,
                                  created_at=env.created_at or record.timestamp / 1000))

    def _resolve(self, env: Envelope, result: p.Result) -> None:
        self.table.resolve(env.request_id, result, tenant=env.tenant, model_id=env.model_id, seq_id=env.seq_id)
        self.deltas.unsubscribe(env.request_id)  # a stream reads the rest from the result

    async def handle_direct(self, record: BusRecord) -> None:
        """A result a worker handed over through this gateway's reply door after publishing it (bus_runtime/
        doors.py): checked exactly as one read from the reply topic, where its copy later changes nothing."""
        # The reply check whatever topic the frame names: a door frame's topic is only its sender's word.
        key = self.settings.reply_signing_key
        check = ReplyCheck(key, record.value, record.headers) if key is not None else None
        decoded = await decode_record(record.value, self.blob_store, {EventType.RESULT}, check=check)
        if isinstance(decoded, Poisoned):
            if isinstance(decoded.error, UnverifiedEvent):
                self.unverified[DOOR] += 1
            log.warning("bus listener drops a result from its reply door: %s", decoded.error)
            return
        assert isinstance(decoded.payload, p.Result)  # the only type allowed above
        self.direct_results += 1
        self._resolve(decoded.env, decoded.payload)

    def _check(self, record: ConsumerRecord) -> ReplyCheck | SignatureCheck | None:
        if record.topic == self.settings.topics.replies:
            key = self.settings.reply_signing_key
            return ReplyCheck(key, record.value, record.headers) if key is not None else None
        return SignatureCheck(self.tenant_keys, record.value, record.headers) if self.tenant_keys else None
