"""cancel_future through the official SDK 0.38, unmodified, on a real gateway, Tansu broker and sampler: a sample
cancelled while it waits on the bus is skipped by the sampler and answers a "cancelled" error; one already
computed keeps its result; training requests cannot be cancelled. The SDK's own path (an abandoned sample future
sends cancel_future, because dynamic_config enables it) is followed onto the bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import tinker
from gateway_stack import API_KEY, STACK_CONFIG, in_thread
from gateway_support import running_gateway
from tinker import types
from tinker._client import AsyncTinker  # the SDK's own HTTP client, as its holder builds it

from bus_events import EventType, decode_envelope, decode_payload
from bus_events import payloads as p
from bus_runtime.log_reader import read_bus
from bus_runtime.settings import BusSettings
from sampler_consumer.worker import run_sampler

pytest_plugins = ["gateway_support", "gateway_stack"]


@contextlib.asynccontextmanager
async def running_sampler(settings: BusSettings) -> AsyncIterator[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(run_sampler(settings, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 120)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def retrieve(client: AsyncTinker, request_id: str) -> dict[str, Any]:
    """The request's answer (JSON), long-polling past try_again as the SDK does."""
    while True:
        answer = await client.post("/api/v1/retrieve_future", body={"request_id": request_id}, cast_to=object)
        if answer.get("type") != "try_again":
            return answer


async def cancel(client: AsyncTinker, request_id: str) -> Any:
    # exactly what the SDK's InternalClientHolder._send_cancel_request posts
    return await client.post("/api/v1/cancel_future", body={"request_id": request_id}, cast_to=object)


async def bus_cancels(settings: BusSettings) -> list[tuple[str, p.Cancel]]:
    """(sampling session, cancel) of every cancel event on the sample topic."""
    found = []
    async for record in read_bus(settings, [settings.topics.sample], lambda key: True, idle_timeout_s=5):
        env = decode_envelope(record.value)
        if env.type == EventType.CANCEL:
            found.append((env.model_id, decode_payload(env)))
    return found


async def test_cancel_skips_a_queued_sample_and_keeps_a_computed_one(stack_settings):
    base_model = stack_settings.base_models[0]
    async with running_gateway(stack_settings, None, STACK_CONFIG) as url:
        client = AsyncTinker(base_url=url, api_key=API_KEY)
        dynamic = await client.service.client_dynamic_config(request=types.ClientConfigRequest(sdk_version="0.38.0"))
        assert dynamic.sample_cancel_enabled  # so the SDK sends cancel_future for abandoned samples
        session = await client.service.create_session(request=types.CreateSessionRequest(
            tags=[], user_metadata={}, sdk_version="0.38.0"))
        sampling = await client.service.create_sampling_session(request=types.CreateSamplingSessionRequest(
            session_id=session.session_id, sampling_session_seq_id=0, base_model=base_model))

        def sample(seq_id: int) -> types.SampleRequest:
            return types.SampleRequest(prompt=types.ModelInput.from_ints([1, 2, 3]), seq_id=seq_id,
                                       sampling_params=types.SamplingParams(max_tokens=2, seed=seq_id),
                                       sampling_session_id=sampling.sampling_session_id)

        dmel = {"type": "dmel", "dmel": "AA=="}  # audio features: the SDK cannot even size one without its tensor
        with pytest.raises(tinker.BadRequestError, match="text-only"):
            await client.post("/api/v1/asample", cast_to=object, body={
                **sample(0).model_dump(mode="json", exclude_none=True),
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}, dmel]}})
        # No sampler yet: both requests wait on the bus, so the first one's cancel is there before it is dequeued.
        queued = await client.sampling.asample(request=sample(1))
        kept = await client.sampling.asample(request=sample(2))
        assert (await cancel(client, queued.request_id))["status"] == "cancel_requested"
        created = await client.service.create_session(request=types.CreateSessionRequest(
            tags=[], user_metadata={}, sdk_version="0.38.0"))
        model = await client.models.create(request=types.CreateModelRequest(
            session_id=created.session_id, model_seq_id=0, base_model=base_model,
            lora_config=types.LoraConfig(rank=4)))
        training_refused: Any = None
        try:
            await cancel(client, model.request_id)
        except tinker.BadRequestError as exc:
            training_refused = exc

        async with running_sampler(stack_settings):
            skipped = await retrieve(client, queued.request_id)
            computed = await retrieve(client, kept.request_id)
            late = await cancel(client, kept.request_id)
            again = await retrieve(client, kept.request_id)

    assert skipped["category"] == "user" and f"request {queued.request_id} was cancelled" in skipped["error"]
    assert len(computed["sequences"]) == 1 and late["status"] == "done" and again == computed
    assert training_refused is not None and "only sample requests can be cancelled" in str(training_refused)


def abandon_a_sample(url: str, base_model: str) -> None:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    sampler = service.create_sampling_client(base_model=base_model).result()
    future = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2))
    with contextlib.suppress(TimeoutError):
        future.result(timeout=3)  # posted and polling: nothing samples yet
    future.cancel()


async def test_the_sdk_cancels_an_abandoned_sample(stack_settings):
    base_model = stack_settings.base_models[0]
    async with running_gateway(stack_settings, None, STACK_CONFIG) as url:
        await in_thread(abandon_a_sample, url, base_model)
        for _ in range(50):  # the SDK sends its cancels from a background task
            cancels = await bus_cancels(stack_settings)
            if cancels:
                break
            await asyncio.sleep(0.2)
    [(sampling_session_id, cancelled)] = cancels
    assert sampling_session_id.endswith(":sample:0") and cancelled.request_id.startswith("req-")
