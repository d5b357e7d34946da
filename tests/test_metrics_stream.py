"""The metrics part (faust-streaming on the real Tansu broker, real S3): curves derived from events on the bus,
tenant-scoped JSON, and a fresh replica rebuilding the same curves from offset 0."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from gateway_support import serving

from bus_events import EventType, make_error_result, make_event, make_result, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.kafka_io import ensure_topics, make_producer, publish
from bus_runtime.net import free_port
from bus_runtime.settings import BusSettings
from metrics_stream.config import MetricsStreamConfig
from metrics_stream.series import MetricsState
from metrics_stream.worker import run_metrics

MODEL = "sess1:train:0"


def fb(tokens: int) -> p.ForwardBackward:
    arr = np.arange(tokens, dtype=np.int32)
    return p.ForwardBackward(data=[p.Datum(tokens=tensor_from_numpy(arr))])


async def publish_steps(settings: BusSettings, steps: int, *, start_seq: int = 0, tenant: str = "alice") -> None:
    """A model's fb + optim_step pairs, each request on the train topic and its reply on the reply topic."""
    producer = make_producer(settings)
    await producer.start()
    try:
        seq = start_seq
        for step in range(steps):
            for payload, result in (
                (fb(10 + step), p.ForwardBackwardResult(outputs=[], metrics={"loss:sum": 5.0 - step})),
                (p.OptimStep(adam_params=p.AdamParams(learning_rate=1e-3)), p.OptimStepResult(metrics={})),
            ):
                env, _ = make_event(EventType.FORWARD_BACKWARD if isinstance(payload, p.ForwardBackward)
                                    else EventType.OPTIM_STEP, payload, model_id=MODEL, seq_id=seq, tenant=tenant)
                await publish(producer, settings.topics.train, env, payload, claim_check_bytes=1 << 20)
                reply_env, reply = make_result(env, result)
                await publish(producer, settings.topics.replies, reply_env, reply, claim_check_bytes=1 << 20)
                seq += 1
        failed, body = make_error_result("r-x", MODEL, tenant, "bad batch", category="user",
                                         request_type="forward_backward")
        await publish(producer, settings.topics.replies, failed, body, claim_check_bytes=1 << 20)
    finally:
        await producer.stop()


@contextlib.asynccontextmanager
async def metrics_part(settings: BusSettings) -> AsyncIterator[str]:
    port, ready = free_port(), asyncio.Event()
    async with serving(run_metrics(settings, ready=ready, config=MetricsStreamConfig(port=port, session_timeout_s=3)),
                       ready):
        yield f"http://127.0.0.1:{port}"


async def wait_for_points(client: httpx.AsyncClient, url: str, name: str, count: int) -> dict:
    body: dict = {}
    for _ in range(300):
        response = await client.get(url)
        if response.status_code == 200:
            body = response.json()
            if len(body["series"].get(name, [])) >= count:
                return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reached {count} points: {body}")


async def test_curves_from_the_bus_tenant_scoped_and_rebuilt_from_offset_0(settings: BusSettings) -> None:
    await ensure_topics(settings)
    await publish_steps(settings, 3)
    async with metrics_part(settings) as base, httpx.AsyncClient(timeout=5) as client:
        body = await wait_for_points(client, f"{base}/v1/models/{MODEL}?tenant=alice", "tokens", 3)
        assert [pt[2] for pt in body["series"]["loss:sum"]] == [5.0, 4.0, 3.0]
        assert [pt[0] for pt in body["series"]["loss:sum"]] == [0, 2, 4]  # x = seq_id
        assert [pt[2] for pt in body["series"]["tokens"]] == [10, 11, 12]
        assert [pt[2] for pt in body["series"]["learning_rate"]] == [1e-3] * 3
        assert body["counts"]["errors"] == 1 and body["counts"]["errors:user"] == 1
        assert len(body["series"]["forward_backward_seconds"]) == 3
        # another tenant sees nothing of alice's model
        assert (await client.get(f"{base}/v1/models/{MODEL}?tenant=bob")).status_code == 404
        assert (await client.get(f"{base}/v1/models?tenant=bob")).json()["models"] == []
        listed = (await client.get(f"{base}/v1/models?tenant=alice")).json()["models"]
        assert [m["model_id"] for m in listed] == [MODEL]
        # live: new steps show up as new points; `since` returns only them
        await publish_steps(settings, 1, start_seq=6)
        body = await wait_for_points(client, f"{base}/v1/models/{MODEL}?tenant=alice&since=4", "loss:sum", 1)
        assert [pt[0] for pt in body["series"]["loss:sum"]] == [6]
        assert "tinker_bus_metrics_records_total" in (await client.get(f"{base}/metrics")).text
        first = (await client.get(f"{base}/v1/models/{MODEL}?tenant=alice")).json()["series"]
    # derived state only: a new replica reads the log from offset 0 and comes to the same curves
    async with metrics_part(settings) as base, httpx.AsyncClient(timeout=5) as client:
        body = await wait_for_points(client, f"{base}/v1/models/{MODEL}?tenant=alice", "tokens", 4)
        assert body["series"]["loss:sum"] == first["loss:sum"]
        assert body["series"]["tokens"] == first["tokens"]


async def test_a_replica_leaves_no_data_folder_where_it_ran(settings: BusSettings, tmp_path, monkeypatch) -> None:
    # faust's default data folder is `<app id>-data` in the working directory: one per replica start, left behind.
    await ensure_topics(settings)
    monkeypatch.chdir(tmp_path)
    async with metrics_part(settings) as base, httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"{base}/metrics")).status_code == 200
    assert list(tmp_path.iterdir()) == []


def test_a_reply_before_its_request_still_joins() -> None:
    state = MetricsState()
    env, payload = make_event(EventType.FORWARD_BACKWARD, fb(7), model_id="m", seq_id=0)
    reply_env, reply = make_result(env, p.ForwardBackwardResult(outputs=[], metrics={"loss:sum": 1.0}))
    state.reply(reply_env, reply, p.ForwardBackwardResult(outputs=[], metrics={"loss:sum": 1.0}))
    assert "tokens" not in state.models["m"].series
    state.request(env, payload)
    assert [pt[2] for pt in state.models["m"].series["tokens"]] == [7.0]


@pytest.mark.parametrize("window", [60.0])
def test_throughput_counts_only_the_tenants_events(window: float) -> None:
    state = MetricsState()
    for tenant in ("alice", "bob"):
        env, payload = make_event(EventType.FORWARD_BACKWARD, fb(30), model_id=f"{tenant}-m", seq_id=0, tenant=tenant)
        state.request(env, payload)
        reply_env, reply = make_result(env, p.ForwardBackwardResult(outputs=[], metrics={}))
        state.reply(reply_env, reply, p.ForwardBackwardResult(outputs=[], metrics={}))
    assert state.throughput("alice", window)["train_tokens_per_s"] == 30 / window
    assert state.throughput(None, window)["train_tokens_per_s"] == 60 / window
