"""Futures over the real bus: a reply published on the real replies topic is served by retrieve_future, by
any gateway instance, after a gateway restart, and only to its tenant; unknown and expired ids are named."""

from __future__ import annotations

import asyncio
import time

import pytest
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    HEADERS_B,
    BusProbe,
    gateway_client,
    retrieve,
    seed_model,
)

from bus_events import EventType
from bus_events import payloads as p
from bus_gateway.futures import FutureTable, new_request_id, request_id_time

pytest_plugins = ["gateway_support"]


async def _optim_step(client, model_id: str, seq_id: int, headers=HEADERS_A) -> str:
    resp = await client.post("/api/v1/optim_step", headers=headers, json={
        "model_id": model_id, "seq_id": seq_id, "type": "optim_step",
        "adam_params": {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}})
    assert resp.status_code == 200, resp.text
    return resp.json()["request_id"]


async def test_reply_on_the_bus_answers_retrieve_future(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        request_id = await _optim_step(client, model_id, 1)
        env, payload = await bus.next_event(EventType.OPTIM_STEP)
        assert (env.request_id, env.model_id, env.seq_id, env.tenant) == (request_id, model_id, 1, "alice")
        assert payload.adam_params.learning_rate == 0.001 and payload.adam_params.eps == 1e-8

        pending = await client.post("/api/v1/retrieve_future", json={"request_id": request_id}, headers=HEADERS_A)
        # no trainer runs in this test: the try_again says so (bus_gateway/observability/queue_state.py)
        assert pending.json() == {"request_id": request_id, "queue_state": "paused_capacity", "type": "try_again",
                                  "queue_state_reason": "no trainer is running: the request waits on the bus until "
                                                        "one starts"}

        await bus.reply(env, p.OptimStepResult(metrics={"grad_norm": 2.5}))
        done = await retrieve(client, request_id, HEADERS_A)
        assert done.json() == {"metrics": {"grad_norm": 2.5}}


async def test_failed_request_is_an_error_and_category(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        request_id = await _optim_step(client, model_id, 1)
        env, _ = await bus.next_event(EventType.OPTIM_STEP)
        await bus.reply(env, error=p.ErrorInfo(message="adapter exploded", category="user"))
        assert (await retrieve(client, request_id, HEADERS_A)).json() == {"error": "adapter exploded",
                                                                          "category": "user"}


async def test_any_instance_answers_and_dedupes(gw_settings):
    """Instance B never saw the POST: it learns the request and its reply from the bus."""
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as a, \
            gateway_client(gw_settings, API_KEYS) as b:
        request_id = await _optim_step(a, model_id, 1)
        env, _ = await bus.next_event(EventType.OPTIM_STEP)
        # A retried POST (same model_id, seq_id) landing on the other instance gets the first promise back.
        await asyncio.sleep(0.5)
        assert await _optim_step(b, model_id, 1) == request_id
        await bus.reply(env, p.OptimStepResult(metrics={"step": 1.0}))
        assert (await retrieve(b, request_id, HEADERS_A)).json() == {"metrics": {"step": 1.0}}
        # Only one event went out for seq 1.
        await _optim_step(a, model_id, 2)
        second, _ = await bus.next_event(EventType.OPTIM_STEP)
        assert second.seq_id == 2


async def test_results_survive_a_gateway_restart(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus:
        async with gateway_client(gw_settings, API_KEYS) as first:
            request_id = await _optim_step(first, model_id, 1)
            env, _ = await bus.next_event(EventType.OPTIM_STEP)
            await bus.reply(env, p.OptimStepResult(metrics={"lr": 0.5}))
        async with gateway_client(gw_settings, API_KEYS) as second:
            assert (await retrieve(second, request_id, HEADERS_A)).json() == {"metrics": {"lr": 0.5}}


async def test_unknown_expired_and_foreign_request_ids(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with gateway_client(gw_settings, API_KEYS) as client:
        unknown = await client.post("/api/v1/retrieve_future", json={"request_id": new_request_id()},
                                    headers=HEADERS_A)
        assert unknown.status_code == 404 and "unknown request_id" in unknown.json()["detail"]
        garbage = await client.post("/api/v1/retrieve_future", json={"request_id": "nope"}, headers=HEADERS_A)
        assert garbage.status_code == 404
        old = new_request_id(time.time() - gw_settings.result_ttl_s - 60)
        expired = await client.post("/api/v1/retrieve_future", json={"request_id": old}, headers=HEADERS_A)
        assert expired.status_code == 410 and "expired" in expired.json()["detail"]
        mine = await _optim_step(client, model_id, 1)
        foreign = await client.post("/api/v1/retrieve_future", json={"request_id": mine}, headers=HEADERS_B)
        assert foreign.status_code == 404


def test_future_table_expires_results_after_the_ttl():
    table = FutureTable(ttl_s=10)
    from bus_gateway.futures import Future

    now = time.time()
    table.add(Future("req-a", "t", EventType.OPTIM_STEP, "m", 1, created_at=now - 11))
    table.add(Future("req-b", "t", EventType.OPTIM_STEP, "m", 2, created_at=now))
    assert table.first_for(("m", 2)).request_id == "req-b"
    assert table.sweep(now) == 1
    assert table.get("req-a") is None and table.first_for(("m", 1)) is None
    assert abs(request_id_time(new_request_id(1234.5)) - 1234.5) < 1e-3



async def test_inner_retries_with_the_same_idempotency_key_get_the_first_promise(gw_settings):
    """Requests without a seq_id (here unload_model) are deduplicated on the SDK's X-Idempotency-Key."""
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        async def unload(key: str) -> str:
            resp = await client.post("/api/v1/unload_model", json={"model_id": model_id},
                                     headers={**HEADERS_A, "X-Idempotency-Key": key})
            return resp.json()["request_id"]

        first = await unload("stainless-python-retry-1")
        assert await unload("stainless-python-retry-1") == first
        second = await unload("stainless-python-retry-2")
        assert second != first
        events = [(await bus.next_event(EventType.UNLOAD_MODEL))[0].request_id for _ in range(2)]
        assert events == [first, second]
        with pytest.raises(TimeoutError):
            await bus.next_event(EventType.UNLOAD_MODEL, timeout=1.0)
