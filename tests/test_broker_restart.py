"""Durable mode: Tansu keeps its log in S3 (SeaweedFS). Restarting the broker in the middle of a run does not stop
the run from finishing with the right weights: clients and trainer wait for the broker, the trainer's group
re-forms, and its models come back through the recovery path."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from recovery_support import BusClient, fresh_settings, sampler_sha, supervised_events, trainers

from bus_events import Topics
from bus_runtime.testing import make_tiny_model
from tinker_bus.infra import SeaweedS3, TansuBroker
from trainer_consumer.config import TrainerConfig

STEPS = 16
CONFIG = TrainerConfig(snapshot_every_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


async def test_a_broker_restart_mid_run_does_not_stop_the_run_from_finishing_right(settings, tiny, tmp_path):
    runs = {f"durable:train:{i}": supervised_events(tiny, seed=60 + i, steps=STEPS) for i in range(2)}
    ref = fresh_settings(settings, "mem", base_models=(tiny,))
    async with trainers(ref, config=CONFIG), BusClient(ref) as client:
        ref_ids = await asyncio.gather(*(client.drive(model, events) for model, events in runs.items()))
        expected = [client.result_values(ids) for ids in ref_ids]
    expected_weights = {model: sampler_sha(ref, model) for model in runs}

    s3 = SeaweedS3(tmp_path / "s3", buckets=("tinker-bus", "tansu"))
    endpoint = s3.start()
    broker = TansuBroker(s3=endpoint, log_file=tmp_path / "tansu.log")
    try:
        broker.start()
        s = replace(settings, kafka_bootstrap=broker.bootstrap, s3_endpoint=endpoint.endpoint,
                    s3_access_key=endpoint.access_key, s3_secret_key=endpoint.secret_key, bucket="tinker-bus",
                    topics=Topics(prefix="durable", train_partitions=4, sample_partitions=2, reply_partitions=2),
                    base_models=(tiny,), trainer_group="trainers-durable")
        async with trainers(s, config=CONFIG) as (trainer,), BusClient(s) as client:
            driving = asyncio.ensure_future(asyncio.gather(*(client.drive(model, events, timeout=180)
                                                             for model, events in runs.items())))
            while len(client.results) < STEPS and not driving.done():  # about half-way
                await asyncio.sleep(0.01)
            assert not driving.done(), driving.exception() if driving.done() else None
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(4.0)  # longer than the group session: the group has to re-form
            await asyncio.to_thread(broker.start)
            ids = await asyncio.wait_for(driving, 240)
            assert not trainer.done()
            for model_ids in ids:
                client.resolved_once(model_ids)
            results = [client.result_values(model_ids) for model_ids in ids]
        assert results == expected
        assert {model: sampler_sha(s, model) for model in runs} == expected_weights
    finally:
        broker.stop()
        s3.stop()
