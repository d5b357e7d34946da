"""Shared pieces of the gateway tests: a tiny base model, a running gateway app, and a bus probe that plays the
worker's part (reads request events off the real topics, publishes results on the real reply topic).

PYTEST_DONT_REWRITE: test modules import this before pytest registers it as a plugin (pytest_plugins).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiokafka import TopicPartition

from artifact_store import Registry, Session, TrainingRun
from bus_events import Envelope, EventType, decode_envelope, decode_payload, make_result
from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from bus_gateway.config import GatewayConfig
from bus_gateway.server import run_gateway
from bus_runtime.kafka_io import ensure_topics, make_consumer, make_producer, publish
from bus_runtime.net import free_port
from bus_runtime.settings import BusSettings, open_object_store
from bus_runtime.testing import make_tiny_model

KEY_A, KEY_B = "tml-alice-key", "tml-bob-key"
API_KEYS = {KEY_A: "alice", KEY_B: "bob"}
HEADERS_A = {"X-API-Key": KEY_A}
HEADERS_B = {"X-API-Key": KEY_B}
FAST = GatewayConfig(long_poll_s=1.0, unknown_request_grace_s=0.5, max_inflight_samples=8)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(Path(tmp_path_factory.mktemp("gateway-model")) / "tiny"))


@pytest.fixture
def gw_settings(settings: BusSettings, tiny_model: str) -> BusSettings:
    return replace(settings, base_models=(tiny_model,))


@contextlib.asynccontextmanager
async def running_gateway(settings: BusSettings, api_keys: dict[str, str] | None = None,
                          config: GatewayConfig = FAST) -> AsyncIterator[str]:
    """The gateway under uvicorn on a free loopback port, in this event loop; yields its base URL."""
    port = free_port()
    ready = asyncio.Event()
    async with serving(run_gateway(settings, api_keys=api_keys, port=port, config=config, ready=ready,
                                   log_level="warning"), ready):
        yield f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serving(run: Coroutine[Any, Any, None], ready: asyncio.Event) -> AsyncIterator[None]:
    """Run a server coroutine in this event loop for the block, entered once it set `ready`; a startup failure
    is raised here. Leaving the block cancels it (its graceful stop)."""
    task = asyncio.create_task(run)
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        await task  # re-raises the startup failure
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def gateway_client(settings: BusSettings, api_keys: dict[str, str] | None = None,
                         config: GatewayConfig = FAST) -> AsyncIterator[httpx.AsyncClient]:
    async with running_gateway(settings, api_keys, config) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as client:
        yield client


def seed_model(settings: BusSettings, tenant: str, model_id: str | None = None,
               session_id: str | None = None) -> str:
    """What the trainer writes on create_model (a run document), so training routes accept the model."""
    registry = Registry(open_object_store(settings))
    session_id = session_id or f"sess-{tenant}"
    registry.put_session(Session(session_id=session_id, tenant=tenant))
    model_id = model_id or f"{session_id}:train:0"
    registry.put_run(TrainingRun(model_id=model_id, base_model=settings.base_models[0], tenant=tenant,
                                 lora=LoraSpec(rank=4),
                                 session_id=session_id))
    return model_id


class BusProbe:
    """Reads what the gateway publishes and answers like a worker would."""

    def __init__(self, settings: BusSettings) -> None:
        self.settings = settings
        self.consumer = make_consumer(settings, group_id=None)
        self.producer = make_producer(settings)
        self.pending: list[tuple[Envelope, Any]] = []
        self.blobs = open_object_store(settings)  # claim-checked payloads

    async def __aenter__(self) -> BusProbe:
        await ensure_topics(self.settings)
        await self.consumer.start()
        await self.producer.start()
        topics = self.settings.topics
        self.consumer.assign([TopicPartition(t, n) for t in (topics.train, topics.sample)
                              for n in range(topics.all()[t])])
        for tp in self.consumer.assignment():
            self.consumer.seek(tp, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def next_event(self, event_type: EventType | None = None, timeout: float = 20.0) -> tuple[Envelope, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, (env, _) in enumerate(self.pending):
                if event_type is None or env.type == event_type:
                    return self.pending.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event_type} event within {timeout} s (saw {self.pending})")
            for records in (await self.consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    env = decode_envelope(record.value)
                    self.pending.append((env, decode_payload(env, self.blobs)))

    async def reply(self, request: Envelope, result: msgspec.Struct | dict | None = None,
                    error: p.ErrorInfo | None = None) -> None:
        env, payload = make_result(request, result, error)
        await publish(self.producer, self.settings.topics.replies, env, payload,
                      claim_check_bytes=self.settings.claim_check_bytes)


async def retrieve(client: httpx.AsyncClient, request_id: str, headers: dict[str, str], *, proto: bool = False,
                   attempts: int = 30) -> Any:
    """Poll retrieve_future like the SDK: re-poll on try_again; the final httpx response."""
    accept = {"Accept": "application/x-protobuf"} if proto else {}
    for _ in range(attempts):
        resp = await client.post("/api/v1/retrieve_future", json={"request_id": request_id},
                                 headers={**headers, **accept})
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("application/json") \
                and resp.json().get("type") == "try_again":
            await asyncio.sleep(0.05)
            continue
        return resp
    raise TimeoutError(f"{request_id} still pending")
