"""Scale out: two trainers in one consumer group share the partitions; stopping one moves its models to the other
with their state intact (the recovery path: snapshot at hand-over, restore, replay of the rest)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.partitioner import murmur2
from recovery_support import BusClient, fresh_settings, sampler_sha, supervised_events, trainers

from bus_runtime.health import read_health
from bus_runtime.settings import open_object_store
from bus_runtime.testing import make_tiny_model
from trainer_consumer.config import TrainerConfig

STEPS = 20
CONFIG = TrainerConfig(snapshot_every_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def one_model_per_partition(partitions: int) -> list[str]:
    """Model ids whose keys land on partitions 0, 1, ..., so both trainers surely own some."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < partitions:
        model = f"scale:train:{n}"
        found.setdefault((murmur2(model.encode()) & 0x7FFFFFFF) % partitions, model)
        n += 1
    return [found[i] for i in range(partitions)]


async def test_stopping_one_of_two_trainers_moves_its_models_to_the_other_intact(settings, tiny, caplog):
    caplog.set_level(logging.INFO, logger="trainer_consumer")
    models = one_model_per_partition(settings.topics.train_partitions)
    runs = {model: supervised_events(tiny, seed=40 + i, steps=STEPS) for i, model in enumerate(models)}

    ref = fresh_settings(settings, "one", base_models=(tiny,))
    async with trainers(ref, config=CONFIG), BusClient(ref) as client:
        ref_ids = await asyncio.gather(*(client.drive(model, events) for model, events in runs.items()))
        expected = [client.result_values(ids) for ids in ref_ids]
    expected_weights = {model: sampler_sha(ref, model) for model in runs}

    s = fresh_settings(settings, "two", base_models=(tiny,))
    async with trainers(s, count=2, config=CONFIG) as (first, second), BusClient(s) as client:
        driving = asyncio.ensure_future(asyncio.gather(*(client.drive(model, events)
                                                         for model, events in runs.items())))
        owners = await _owners(s)
        assert sorted(len(partitions) for partitions in owners.values()) == [2, 2]  # the group shares the work
        while len(client.results) < len(models) * STEPS and not driving.done():  # about half-way
            await asyncio.sleep(0.01)
        assert not driving.done(), driving.exception()
        first.cancel()  # a graceful stop: running steps finish, models are snapshotted, offsets committed
        await asyncio.gather(first, return_exceptions=True)
        ids = await asyncio.wait_for(driving, 120)
        assert not second.done()
        for model_ids in ids:
            client.resolved_once(model_ids)
        results = [client.result_values(model_ids) for model_ids in ids]
    assert results == expected
    assert {model: sampler_sha(s, model) for model in runs} == expected_weights
    moved = {r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("restored model")}
    assert len(moved) >= 2  # the stopped trainer's models (and the survivor's own, after the eager rebalance)


async def _owners(settings) -> dict[str, list[int]]:
    """Which partitions each live trainer reports in its heartbeat, once two report."""
    store = open_object_store(settings)
    for _ in range(100):
        alive = [h for h in await asyncio.to_thread(read_health, store) if h.role == "trainer" and h.alive]
        if len(alive) == 2 and all(len(h.detail.get("partitions", [])) == 2 for h in alive):
            return {h.instance: h.detail["partitions"] for h in alive}
        await asyncio.sleep(0.1)
    return {h.instance: h.detail.get("partitions", []) for h in alive}
