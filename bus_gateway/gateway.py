"""The Gateway service: the state every route shares and the few operations below the submission layer:
publish a request (with the one dedupe), void a rejected seq_id, and look up tenant-owned things (sessions,
models, sampling sessions, JSON-API adapter names)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiokafka import AIOKafkaProducer
from litestar.exceptions import ClientException

from artifact_store import CheckpointStore, Registry, SamplingSession, Session, TrainingRun
from bus_events import MAX_SEQ_AHEAD, TRAINING_EVENTS, EventType, event_type_of, make_event
from bus_events import payloads as p
from bus_events.ids import is_model_id
from bus_gateway.adapter_names import AdapterName, AdapterNames, InvalidAdapterName, check_adapter_name
from bus_gateway.base_model_info import BaseModelCatalog
from bus_gateway.bus_listener import BusListener
from bus_gateway.completions import CompletionLog
from bus_gateway.config import GatewayConfig
from bus_gateway.errors import FieldError, NotFound, NotYetKnown
from bus_gateway.futures import IDEMPOTENCY_KEY, Future, FutureTable, new_request_id, request_id_time
from bus_gateway.intake_doors import IntakeDoors
from bus_gateway.streams import DeltaRouter
from bus_gateway.tokens import TokenIssuer
from bus_gateway.validation import check_model_id
from bus_runtime.doors import DoorServer
from bus_runtime.kafka_io import ensure_topics, make_producer, publish
from bus_runtime.settings import BusSettings, open_object_store

log = logging.getLogger(__name__)
S = TypeVar("S", bound=msgspec.Struct)

SWEEP_INTERVAL_S = 30.0


class Gateway:
    def __init__(self, settings: BusSettings, config: GatewayConfig, api_keys: dict[str, str] | None) -> None:
        self.settings = settings
        self.config = config
        self.api_keys = api_keys
        self.tokens = TokenIssuer(config.jwt_secret, config.jwt_ttl_s)  # also signs trace download links
        self.objects = open_object_store(settings)
        self.tenant_keys = settings.tenant_keys  # requests are signed as their tenant (bus_events/signing.py)
        self.registry = Registry(self.objects)
        self.adapter_names = AdapterNames(self.objects)
        self.checkpoints = CheckpointStore(self.objects)
        self.base_models = BaseModelCatalog(settings.base_models)
        self.futures = FutureTable(settings.result_ttl_s)
        self.completions = CompletionLog(settings.result_ttl_s)  # /api/v1/retrieve_futures
        self.futures.on_resolve.append(self.completions.record)
        self.deltas = DeltaRouter()  # sampling progress of streamed requests (OpenAI API, stream=true)
        self.listener = BusListener(settings, self.futures, self.objects, self.deltas)
        self.door = DoorServer(config.reply_door_host, self.listener.handle_direct) if config.reply_door_host \
            else None
        self.producer: AIOKafkaProducer | None = None
        self.intake = IntakeDoors(self.objects)  # the trainers' doors, to hand them what is published here
        self._sweeper: asyncio.Task | None = None
        # Immutable facts (tenant of a session / sampling session) are cached forever; runs briefly,
        # because unload flips `unloaded`.
        self._sessions: dict[str, Session] = {}
        self._sampling_sessions: dict[str, SamplingSession] = {}
        self._runs: dict[str, tuple[float, TrainingRun]] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    def lock(self, *key: str) -> asyncio.Lock:
        """One lock per key in this process (e.g. per adapter name while it is being created)."""
        return self._locks.setdefault(key, asyncio.Lock())

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.tenant_keys and self.settings.reply_signing_key is None:
            log.warning("TINKER_BUS_EVENT_KEYS is set but TINKER_BUS_REPLY_KEY is not: results on the bus are not "
                        "checked, so whoever can write the reply topic can answer any future")
        await asyncio.to_thread(self.objects.ensure_bucket)
        await ensure_topics(self.settings)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        await self.listener.start()
        if self.door is not None:
            await self.door.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="gateway-future-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.intake.close()
        if self.door is not None:
            await self.door.stop()
        await self.listener.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.futures.sweep()
            self.completions.sweep()

    # ------------------------------------------------------------------ publishing
    def first_request(self, key: str, seq_id: int | None, event_type: EventType, tenant: str) -> Future | None:
        """The future of an earlier request this one retries: same (model or sampling session, seq_id), or the
        same X-Idempotency-Key (the SDK's inner retries resend it) for requests without a seq_id."""
        first = self.futures.first_for((key, seq_id)) if seq_id is not None else None
        header = IDEMPOTENCY_KEY.get()
        if first is None and header:
            first = self.futures.first_for_idempotency((tenant, event_type.value, header))
        return first if first is not None and first.tenant == tenant else None

    async def submit(
        self,
        kind: type[S],
        build: Callable[[], S | Awaitable[S]],
        *,
        model_id: str,
        seq_id: int | None,
        tenant: str,
        check: Callable[[S], Awaitable[None] | None] | None = None,
        context: dict[str, Any] | None = None,
    ) -> Future:
        """Publish one request whose payload is a `kind` and register its future; the event type follows from
        `kind`. A retry gets the first request's future back before anything is parsed. `build` (parse the
        body into the payload) and `check` (validate it) raise FieldError on bad input; a training request
        rejected so still consumed its seq_id on the client, so the trainer is told (seq_void) not to wait."""
        event_type = event_type_of(kind)
        if (first := self.first_request(model_id, seq_id, event_type, tenant)) is not None:
            return first
        sequenced = seq_id is not None and event_type in TRAINING_EVENTS
        if sequenced:
            self.check_seq_id(model_id, seq_id)  # type: ignore[arg-type]
        try:
            built = build()
            payload = await built if inspect.isawaitable(built) else built
            checked = check(payload) if check is not None else None
            if inspect.isawaitable(checked):
                await checked
        except FieldError as exc:
            if sequenced:
                await self.void_seq(model_id, seq_id, str(exc), tenant, event_type)  # type: ignore[arg-type]
                exc.voided = True
            raise
        return await self._publish(event_type, payload, model_id=model_id, seq_id=seq_id, tenant=tenant,
                                   context=context)

    async def _publish(self, event_type: EventType, payload: msgspec.Struct, *, model_id: str, seq_id: int | None,
                       tenant: str, context: dict[str, Any] | None) -> Future:
        header = IDEMPOTENCY_KEY.get()
        idempotency = (tenant, event_type.value, header) if header else None
        fut = self.futures.add(Future(new_request_id(), tenant, event_type.value, model_id, seq_id, local=True,
                                      context=context or {}, idempotency_key=idempotency))
        topic = self.settings.topics.sample if event_type == EventType.SAMPLE else self.settings.topics.train
        event = make_event(event_type, payload, model_id=model_id, request_id=fut.request_id, seq_id=seq_id,
                           tenant=tenant)
        # Doors for training only: a rollout's thousands of sample results would each be decoded twice here.
        training = topic == self.settings.topics.train
        door = self.door.door if self.door is not None and training else None
        handover = self.intake.handover() if training else None  # its trainer may take it before its next fetch
        try:
            record = await publish(self._producer(), topic, event.env, event.payload, blob_store=self.objects,
                                   claim_check_bytes=self.settings.claim_check_bytes, signing_keys=self.tenant_keys,
                                   extra_headers=[door.header()] if door is not None else (),
                                   announce=handover.announce if handover is not None else None)
        except BaseException as exc:
            self.futures.discard(fut)
            if handover is not None:
                handover.settle(None)
            if isinstance(exc, (UnicodeEncodeError, OverflowError)):  # what JSON can say but msgpack cannot carry
                raise FieldError("body", "strings must be valid Unicode text (no lone surrogates) and integers "
                                         f"must fit in 64 bits: {exc}") from exc
            raise
        if handover is not None:
            handover.settle(record)
        return fut

    def check_seq_id(self, model_id: str, seq_id: int) -> None:
        """Refuse a seq_id more than MAX_SEQ_AHEAD past the highest one this gateway saw for the model (from any
        gateway, through the bus listener). A model nobody used within the result TTL is not checked here; the
        trainer refuses such a jump against the model's real position all the same."""
        highest = self.futures.highest_seq(model_id)
        if highest is not None and seq_id > highest + MAX_SEQ_AHEAD:
            raise FieldError("seq_id", f"{seq_id} is more than {MAX_SEQ_AHEAD} ahead of seq_id {highest}, the "
                                       f"highest model {model_id!r} has used; seq_ids count the model's requests "
                                       "one by one")

    async def void_refused(self, model_ref: str, seq_id: int, reason: str, tenant: str,
                           request_type: EventType) -> None:
        """Void the seq_id of a training request refused before `submit` (its body did not parse): only for the
        caller's own live model, a seq_id no request was published with, within the jump bound. Raises NotFound /
        FieldError when it may not."""
        model_id, _ = await self.live_model(model_ref, tenant)
        if self.futures.first_for((model_id, seq_id)) is not None:
            return  # a retry of a request that went through: its seq_id is not burnt
        self.check_seq_id(model_id, seq_id)
        await self.void_seq(model_id, seq_id, reason, tenant, request_type)

    async def void_seq(self, model_id: str, seq_id: int, reason: str, tenant: str,
                       request_type: EventType | None = None) -> None:
        """Tell the trainer that `seq_id` was rejected here, so its reorder buffer does not wait for it. The
        request type lets the trainer keep the gradient window open when the void was not a forward_backward."""
        void = p.SeqVoid(reason=reason[:2000], request_type=request_type.value if request_type else "")
        event = make_event(EventType.SEQ_VOID, void, model_id=model_id, seq_id=seq_id, tenant=tenant)
        try:
            await publish(self._producer(), self.settings.topics.train, event.env, event.payload,
                          claim_check_bytes=self.settings.claim_check_bytes, signing_keys=self.tenant_keys)
        except Exception:  # the trainer's gap timeout still covers it; the client gets its 400 regardless
            log.exception("could not publish seq_void for %s seq %s", model_id, seq_id)

    async def cancel(self, fut: Future, reason: str = "") -> None:
        """Ask the sampler holding sample request `fut` to skip it (docs/events.md `cancel`): same topic and key,
        so the cancel lands after the request on its partition."""
        event = make_event(EventType.CANCEL, p.Cancel(request_id=fut.request_id, reason=reason[:2000]),
                           model_id=fut.model_id, tenant=fut.tenant)
        await publish(self._producer(), self.settings.topics.sample, event.env, event.payload,
                      claim_check_bytes=self.settings.claim_check_bytes, signing_keys=self.tenant_keys)

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

    async def update_session(self, session_id: str, tenant: str, change: Callable[[Session], None]) -> Session:
        """Apply `change` to the caller's stored session document, read afresh: another gateway may have written
        it since this one cached it (a heartbeat must not undo a project assignment or a finish)."""
        cached = await self.session(session_id, tenant)

        def read_change_write() -> Session:
            fresh = self.registry.get_session(session_id) or cached
            change(fresh)
            self.registry.put_session(fresh)
            return fresh

        fresh = await asyncio.to_thread(read_change_write)
        self.remember_session(fresh)
        return fresh

    async def run(self, model_id: str, tenant: str, *, fresh: bool = False) -> TrainingRun:
        check_model_id(model_id)  # it becomes part of an object key: never `../`
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

    async def adapter_name(self, name: str, tenant: str, field: str = "model_id") -> AdapterName | None:
        """The caller's document for JSON-API adapter `name` (None if never created); 400 on an invalid name."""
        try:
            check_adapter_name(name)
        except InvalidAdapterName as exc:
            raise FieldError(field, str(exc)) from exc
        return await asyncio.to_thread(self.adapter_names.get, tenant, name)

    async def live_model(self, ref: str, tenant: str, field: str = "model_id") -> tuple[str, str]:
        """(model id, base model) of a model that can take requests: `ref` is a model id (`<session>:train:<n>`)
        or the caller's JSON-API adapter name, whose model may still be on its way to the trainer."""
        if is_model_id(ref):
            run = await self.live_run(ref, tenant)
            return run.model_id, run.base_model
        record = await self.adapter_name(ref, tenant, field)
        if record is None or record.removed:
            raise NotFound(f"adapter {ref!r} not found")
        return record.model_id, record.base_model

    async def future(self, request_id: str, tenant: str) -> Future:
        """The caller's future; 410 if its id is older than the result TTL, 404 if nobody ever issued it."""
        fut = self.futures.get(request_id)
        if fut is None:
            issued_at = request_id_time(request_id)
            ttl = self.settings.result_ttl_s
            if issued_at is not None and issued_at < time.time() - ttl:
                raise ClientException(status_code=410,
                                      detail=f"request {request_id!r} expired: results are kept for {ttl:g} s")
            if issued_at is not None:  # well-formed: another gateway may have issued it a moment ago
                fut = await self.futures.wait_for_id(request_id, self.config.unknown_request_grace_s)
                if fut is None and not self.listener.caught_up:
                    raise NotYetKnown(f"request {request_id!r} not read from the bus yet; try again")
        if fut is None or fut.tenant != tenant:
            raise NotFound(f"unknown request_id {request_id!r}")
        return fut

    async def sampling_session(self, sampling_session_id: str, tenant: str) -> SamplingSession:
        return await self._owned(self._sampling_sessions, sampling_session_id, self.registry.get_sampling_session,
                                 tenant, "sampling session")

    async def put_sampling_session(self, sampling_session: SamplingSession) -> None:
        await asyncio.to_thread(self.registry.put_sampling_session, sampling_session)
        self._sampling_sessions[sampling_session.sampling_session_id] = sampling_session
