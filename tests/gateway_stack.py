"""The whole stack in-process for SDK end-to-end tests: trainer + sampler workers and the gateway under uvicorn,
on the real Tansu broker and moto S3 of the conftest fixtures. The SDK itself runs in a worker thread (it
blocks on futures), so the stack's event loop keeps serving it.

PYTEST_DONT_REWRITE: test modules import this before pytest registers it as a plugin (pytest_plugins).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from gateway_support import running_gateway

from bus_gateway.config import GatewayConfig
from bus_runtime.settings import BusSettings
from sampler_consumer.worker import run_sampler
from trainer_consumer.worker import run_trainer

T = TypeVar("T")
API_KEY = "tml-e2e"
STACK_CONFIG = GatewayConfig(long_poll_s=10.0, unknown_request_grace_s=2.0)


@contextlib.asynccontextmanager
async def running_stack(settings: BusSettings, config: GatewayConfig = STACK_CONFIG,
                        api_keys: dict[str, str] | None = None) -> AsyncIterator[str]:
    trainer_ready, sampler_ready = asyncio.Event(), asyncio.Event()
    workers = [asyncio.create_task(run_trainer(settings, ready=trainer_ready), name="e2e-trainer"),
               asyncio.create_task(run_sampler(settings, ready=sampler_ready), name="e2e-sampler")]
    try:
        async with running_gateway(settings, api_keys, config) as url:
            waiting = asyncio.gather(trainer_ready.wait(), sampler_ready.wait())
            done, _ = await asyncio.wait([waiting, *workers], timeout=120, return_when=asyncio.FIRST_COMPLETED)
            for task in workers:
                if task in done:
                    await task  # a worker that died on startup: raise why
            if waiting not in done:
                raise TimeoutError("workers did not join their consumer groups within 120 s")
            yield url
    finally:
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking SDK code off the event loop that serves it."""
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
def stack_settings(gw_settings: BusSettings) -> BusSettings:
    # Short group sessions: the workers join in about a second.
    return replace(gw_settings, session_timeout_ms=2000)
