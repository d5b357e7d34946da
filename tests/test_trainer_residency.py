"""The trainer's idle lifecycle (trainer_consumer/residency.py, issue 20 item 9): models beyond the residency bound,
idle ones and those of sessions without heartbeats leave memory once durable, and come back from their snapshot
on their next event with exactly the state they left with. Real HF backend, real S3."""

from __future__ import annotations

import asyncio
import time

import pytest
from trainer_support import EngineHarness, adam, adapter_weights, fb, fresh_objects, random_data

from artifact_store import Registry, Session
from bus_events import EventType
from bus_events import payloads as p
from bus_runtime.testing import make_tiny_model
from trainer_consumer.config import TrainerConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _resident(h: EngineHarness, model_id: str) -> bool:
    return model_id in h.engine.streams or model_id in h.backend._models.adapters


async def _until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def _step(h: EngineHarness, model_id: str, seq: int, seed: int) -> dict:
    fwd = await h.ok(EventType.FORWARD_BACKWARD, fb(random_data(seed, 2)), model_id, seq)
    await h.ok(EventType.OPTIM_STEP, adam(), model_id, seq + 1)
    return fwd


async def test_beyond_the_bound_the_least_recently_used_model_is_offloaded_and_reloads_exactly(tiny, s3_endpoint):
    config = TrainerConfig(max_resident_adapters=1, marker_interval_s=0.0, idle_offload_s=0, session_expiry_s=0)
    async with EngineHarness(tiny, fresh_objects(s3_endpoint), config) as h, \
            EngineHarness(tiny, fresh_objects(s3_endpoint), TrainerConfig(max_resident_adapters=0)) as straight:
        for harness in (h, straight):
            await harness.create("a", seed=1)
            await _step(harness, "a", 1, seed=10)
        await h.create("b", seed=2)
        await _until(lambda: not _resident(h, "a"))  # a: least recently used, over the bound of 1
        assert _resident(h, "b") and h.engine.residency.offloads == 1
        reloaded = await _step(h, "a", 3, seed=11)  # its next event restores it from the snapshot
        assert reloaded == await _step(straight, "a", 3, seed=11)
        weights, expected = adapter_weights(h.backend, "a"), adapter_weights(straight.backend, "a")
        assert weights.keys() == expected.keys() and all((weights[k] == expected[k]).all() for k in weights)
        await _until(lambda: not _resident(h, "b"))  # now b is the least recently used one


async def test_idle_models_and_models_of_expired_sessions_are_offloaded_but_busy_ones_stay(tiny, s3_endpoint):
    objects = fresh_objects(s3_endpoint)
    registry = Registry(objects)
    registry.put_session(Session(session_id="gone", tenant="t", last_heartbeat=time.time() - 3600))
    registry.put_session(Session(session_id="here", tenant="t"))
    config = TrainerConfig(max_resident_adapters=0, idle_offload_s=0, session_expiry_s=60, marker_interval_s=0.0)
    async with EngineHarness(tiny, objects, config) as h:
        await h.create("gone:train:0")
        await h.create("here:train:0")
        await h.send(EventType.FORWARD_BACKWARD, fb(random_data(3, 2)), "here:train:0", 1)  # an open window
        h.engine._sessions_checked = 0.0  # check the sessions at the next tick, not in 30 s
        await _until(lambda: not _resident(h, "gone:train:0"))
        assert _resident(h, "here:train:0")
        info = await h.ok(EventType.GET_INFO, p.GetInfo(), "gone:train:0", 1)
        assert info["model_id"] == "gone:train:0"
    idle = TrainerConfig(max_resident_adapters=0, idle_offload_s=0.5, session_expiry_s=0, marker_interval_s=0.0)
    async with EngineHarness(tiny, fresh_objects(s3_endpoint), idle) as h:
        await h.create("m")
        await h.send(EventType.FORWARD_BACKWARD, fb(random_data(4, 2)), "m", 1)
        await asyncio.sleep(1.0)
        assert _resident(h, "m")  # its gradient window is open: it cannot be snapshotted, so it stays
        await h.ok(EventType.OPTIM_STEP, adam(), "m", 2)
        await _until(lambda: not _resident(h, "m"))
        assert (await h.ok(EventType.GET_INFO, p.GetInfo(), "m", 3))["step"] == 1
