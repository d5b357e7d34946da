"""The gateway's shared state and the few operations every route uses: publish a request (with dedupe),
void a rejected seq_id, and look up tenant-owned things (sessions, models, sampling sessions)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from artifact_store import CheckpointStore, Registry, SamplingSession, Session, TrainingRun
from bus_events import EventType, make_event
from bus_events import payloads as p
from bus_gateway.base_model_info import BaseModelCatalog
from bus_gateway.bus_listener import BusListener
from bus_gateway.config import GatewayConfig
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.futures import IDEMPOTENCY_KEY, Future, FutureTable, new_request_id
from bus_runtime.kafka_io import ensure_topics, make_producer, publish
from bus_runtime.settings import BusSettings, open_object_store

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0


class Gateway:
    def __init__(self, settings: BusSettings, config: GatewayConfig, api_keys: dict[str, str] | None) -> None:
        self.settings = settings
        self.config = config
        self.api_keys = api_keys
        self.objects = open_object_store(settings)
        self.registry = Registry(self.objects)
        self.checkpoints = CheckpointStore(self.objects)
        self.base_models = BaseModelCatalog(settings.base_models)
        self.futures = FutureTable(settings.result_ttl_s)
        self.listener = BusListener(settings, self.futures, self.objects)
        self.producer: AIOKafkaProducer | None = None
        self._sweeper: asyncio.Task | None = None
        # Immutable facts (tenant of a session / sampling session) are cached forever; runs briefly,
        # because unload flips `unloaded`.
        self._sessions: dict[str, Session] = {}
        self._sampling_sessions: dict[str, SamplingSession] = {}
        self._runs: dict[str, tuple[float, TrainingRun]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await asyncio.to_thread(self.objects.ensure_bucket)
        await ensure_topics(self.settings)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        await self.listener.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="gateway-future-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.listener.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.futures.sweep()

    # ------------------------------------------------------------------ publishing
    async def submit(
        self,
        event_type: EventType,
        payload: msgspec.Struct,
        *,
        model_id: str,
        seq_id: int | None,
        tenant: str,
        context: dict[str, Any] | None = None,
    ) -> Future:
        """Publish a request and register its future. A retry returns the first future: same (model_id, seq_id),
        or the same X-Idempotency-Key (the SDK's inner retries resend it) for requests without a seq_id."""
        if seq_id is not None and (first := self.futures.first_for((model_id, seq_id))) is not None:
            return first
        header = IDEMPOTENCY_KEY.get()
        idempotency = (tenant, event_type.value, header) if header else None
        if idempotency is not None and (first := self.futures.first_for_idempotency(idempotency)) is not None:
            return first
        fut = self.futures.add(Future(new_request_id(), tenant, event_type.value, model_id, seq_id, local=True,
                                      context=context or {}, idempotency_key=idempotency))
        topic = self.settings.topics.sample if event_type == EventType.SAMPLE else self.settings.topics.train
        env, body = make_event(event_type, payload, model_id=model_id, request_id=fut.request_id, seq_id=seq_id,
                               tenant=tenant)
        try:
            await publish(self._producer(), topic, env, body, blob_store=self.objects,
                          claim_check_bytes=self.settings.claim_check_bytes)
        except (UnicodeEncodeError, OverflowError) as exc:  # what JSON can say but msgpack cannot carry
            self.futures.discard(fut)
            raise FieldError("body", "strings must be valid Unicode text (no lone surrogates) and integers "
                                     f"must fit in 64 bits: {exc}") from exc
        except BaseException:
            self.futures.discard(fut)
            raise
        return fut

    async def void_seq(self, model_id: str, seq_id: int, reason: str, tenant: str,
                       request_type: EventType | None = None) -> None:
        """Tell the trainer that `seq_id` was rejected here, so its reorder buffer does not wait for it. The
        request type lets the trainer keep the gradient window open when the void was not a forward_backward."""
        void = p.SeqVoid(reason=reason[:2000], request_type=request_type.value if request_type else "")
        env, body = make_event(EventType.SEQ_VOID, void, model_id=model_id,
                               seq_id=seq_id, tenant=tenant)
        try:
            await publish(self._producer(), self.settings.topics.train, env, body,
                          claim_check_bytes=self.settings.claim_check_bytes)
        except Exception:  # the trainer's gap timeout still covers it; the client gets its 400 regardless
            log.exception("could not publish seq_void for %s seq %s", model_id, seq_id)

    def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            raise RuntimeError("gateway not started")
        return self.producer

    # ------------------------------------------------------------------ tenant-owned lookups (404 otherwise)
    async def _owned(self, cache: dict[str, Any], key: str, fetch: Callable[[str], Any], tenant: str,
                     what: str) -> Any:
        """A registry document, cached once found, that only its own tenant may see (others get 404)."""
        found = cache.get(key)
        if found is None:
            found = await asyncio.to_thread(fetch, key)
            if found is not None:
                cache[key] = found
        if found is None or found.tenant != tenant:
            raise NotFound(f"{what} {key!r} not found")
        return found

    async def session(self, session_id: str, tenant: str) -> Session:
        return await self._owned(self._sessions, session_id, self.registry.get_session, tenant, "session")

    def remember_session(self, session: Session) -> None:
        self._sessions[session.session_id] = session

    async def run(self, model_id: str, tenant: str, *, fresh: bool = False) -> TrainingRun:
        cached = self._runs.get(model_id)
        if cached is not None and not fresh and time.monotonic() - cached[0] < self.config.run_cache_s:
            run = cached[1]
        else:
            found = await asyncio.to_thread(self.registry.get_run, model_id)
            if found is None:
                self._runs.pop(model_id, None)
                raise NotFound(f"model {model_id!r} not found")
            run = found
            self._runs[model_id] = (time.monotonic(), run)
        if run.tenant != tenant:
            raise NotFound(f"model {model_id!r} not found")
        return run

    async def live_run(self, model_id: str, tenant: str) -> TrainingRun:
        """A model that can still take requests (exists, is the caller's, not unloaded)."""
        run = await self.run(model_id, tenant)
        if run.unloaded:
            run = await self.run(model_id, tenant, fresh=True)
        if run.unloaded:
            raise NotFound(f"model {model_id!r} was unloaded")
        return run

    async def sampling_session(self, sampling_session_id: str, tenant: str) -> SamplingSession:
        return await self._owned(self._sampling_sessions, sampling_session_id, self.registry.get_sampling_session,
                                 tenant, "sampling session")

    async def put_sampling_session(self, sampling_session: SamplingSession) -> None:
        await asyncio.to_thread(self.registry.put_sampling_session, sampling_session)
        self._sampling_sessions[sampling_session.sampling_session_id] = sampling_session
