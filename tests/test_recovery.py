"""Recovery: a trainer SIGKILLed at random moments loses nothing (real Tansu broker, real S3, the trainer as a
real subprocess). Each restart rebuilds its models from their snapshots plus the log after them."""

from __future__ import annotations

import asyncio
import random

import pytest
from aiokafka import TopicPartition
from recovery_support import BusClient, TrainerProcess, fresh_settings, sampler_sha, supervised_events, trainers
from trainer_support import EngineHarness, adapter_weights, fresh_objects

from bus_events import EventType, make_event
from bus_events import payloads as p
from bus_events.results import outcome
from bus_runtime.offsets import OffsetTracker
from bus_runtime.testing import make_tiny_model
from trainer_consumer.config import TrainerConfig
from trainer_consumer.durability import Durability, DurablePoint
from trainer_consumer.inbound import BusPosition, Inbound

SNAPSHOT_EVERY = 4  # small, so that the restarts go through snapshots AND through replays of several steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


async def test_five_sigkills_during_a_40_step_run_of_3_models_lose_nothing(settings, tiny, tmp_path):
    runs = {f"kill:train:{i}": supervised_events(tiny, seed=20 + i, steps=40, eval_every=10) for i in range(3)}

    # The uninterrupted run: the same code in-process, with the subprocess's single torch thread.
    ref = fresh_settings(settings, "ref", base_models=(tiny,))
    config = TrainerConfig(torch_threads=1, snapshot_every_steps=SNAPSHOT_EVERY)
    async with trainers(ref, config=config), BusClient(ref) as client:
        ref_ids = await asyncio.gather(*(client.drive(model, events) for model, events in runs.items()))
        expected_results = [client.result_values(ids) for ids in ref_ids]
    expected_weights = {model: sampler_sha(ref, model) for model in runs}

    s = fresh_settings(settings, "kill", base_models=(tiny,))
    log_file = tmp_path / "trainer.log"
    trainer = TrainerProcess(s, log_file, snapshot_every_steps=SNAPSHOT_EVERY)
    # Random moments spread over the run: after a random number of answered requests each (of the 258), plus a
    # random fraction of a step; one kill instead hits the restart before it while that replays the log.
    rng = random.Random(6)
    total = sum(map(len, runs.values()))
    kill_points = sorted(rng.sample(range(10, total - 20), 5))
    during_replay = rng.randrange(1, 5)
    kills = 0
    try:
        async with BusClient(s) as client:
            trainer.start()
            driving = asyncio.ensure_future(asyncio.gather(
                *(client.drive(model, events, timeout=180) for model, events in runs.items())))
            for kill, point in enumerate(kill_points):
                if kill == during_replay:  # the first results the restarted trainer (re-)publishes
                    replies = sum(map(len, client.results.values()))
                    reached = lambda r=replies: sum(map(len, client.results.values())) > r  # noqa: E731
                else:
                    reached = lambda p=point: len(client.results) >= p  # noqa: E731
                while not reached() and not driving.done():
                    await asyncio.sleep(0.01)
                assert not driving.done(), f"the run ended after {kills} kills"
                await asyncio.sleep(rng.uniform(0, 0.05))
                trainer.kill()
                kills += 1
                trainer.start()
            ids = await driving
            counts = [client.resolved_once(model_ids) for model_ids in ids]  # every future resolved, once
            results = [client.result_values(model_ids) for model_ids in ids]
    finally:
        trainer.stop()
    assert kills == 5
    assert results == expected_results  # every reply (losses, logprobs, metrics) as in the uninterrupted run
    assert {model: sampler_sha(s, model) for model in runs} == expected_weights
    republished = sum(n - 1 for per_model in counts for n in per_model.values())
    assert republished > 0, "no kill ever interrupted anything"
    log_text = log_file.read_text()
    assert log_text.count("===== start") == 6 and "restored model kill:train:" in log_text


async def test_a_restored_engine_skips_what_its_snapshot_covers_and_applies_the_rest(tiny, s3_endpoint):
    """No Kafka: the same event log fed to a second engine after the first one crashed (no graceful stop)."""
    objects = fresh_objects(s3_endpoint)
    config = TrainerConfig(snapshot_every_steps=2, marker_interval_s=0.0)
    events = supervised_events(tiny, seed=4, steps=5)[:-1]
    log = [Inbound(*_envelope(kind, payload, seq), position=BusPosition("t", 0, 100 + seq))
           for kind, payload, seq in events]

    async with EngineHarness(tiny, objects, config) as first:
        # create + 3.5 steps: the snapshot after step 2 written, then the crash mid-window. The snapshot is awaited
        # before the rest goes in: captured later (a slow S3 put), it would cover step 3 as well.
        for inbound in log[:5]:
            await first.engine.submit(inbound)
        await first.reply(log[4].env.request_id)
        for _ in range(500):
            point = first.engine.streams["m"].durability.point
            if point.last_seq is not None and point.last_seq >= 4:
                break
            await asyncio.sleep(0.02)
        await _writes_done(first)
        for inbound in log[5:8]:
            await first.engine.submit(inbound)
        await first.reply(log[7].env.request_id)
        await _writes_done(first)
        stream = first.engine.streams["m"]
        assert stream.durability.point.last_seq == 4  # the snapshot after step 2 (seq 4); 5..7 are owed
        assert first.engine.holds() == {("t", 0): 105}

    async with EngineHarness(tiny, objects, config) as second:
        for inbound in log:  # the log from the start, as a consumer would re-read it
            await second.engine.submit(inbound)
        await second.reply(log[-1].env.request_id)
        replied = {i.env.seq_id for i in second.finished if second.replies.get(i.env.request_id)}
        assert replied == set(range(5, len(log)))  # 0..4 covered: finished silently, never applied twice
        assert (await second.ok(EventType.GET_INFO, p.GetInfo(), "m", len(log)))["step"] == 5

    async with EngineHarness(tiny, fresh_objects(s3_endpoint), config) as straight:
        for inbound in log:
            await straight.engine.submit(Inbound(inbound.env, inbound.payload))
        await straight.reply(log[-1].env.request_id)
        assert all([outcome(r) for r in second.replies[i.env.request_id]]
                   == [outcome(r) for r in straight.replies[i.env.request_id]] for i in log[5:])
        weights, expected = adapter_weights(second.backend, "m"), adapter_weights(straight.backend, "m")
        assert weights.keys() == expected.keys() and all((weights[k] == expected[k]).all() for k in weights)


def _envelope(kind, payload, seq):
    return make_event(kind, payload, model_id="m", seq_id=seq)


async def _writes_done(harness: EngineHarness) -> None:
    for _ in range(200):
        if not harness.engine.recovery.writers:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("snapshot writes did not finish")


def test_a_snapshot_write_keeps_its_events_owed_until_it_succeeds():
    durability = Durability()
    durability.finished(0, 10, applied=True, holds=True)  # create_model at offset 10
    durability.lasting_effect(new_state=True)
    assert durability.effective_hold() == 10 and durability.snapshot_due(every_steps=10, interval_s=60)
    capture = durability.capture("snapshot")
    durability.finished(1, 11, applied=True, holds=True)  # arrives while the upload runs
    assert durability.effective_hold() == 10
    durability.failed(capture)  # the upload failed: everything is owed again, and the snapshot is due again
    assert durability.effective_hold() == 10 and durability.snapshot_due(every_steps=10, interval_s=60)
    durability.written(durability.capture("snapshot"), "v-1")
    assert durability.effective_hold() is None and durability.point == DurablePoint(1, 11, None)
    durability.finished(2, 13, applied=True, holds=True)  # a get_info: nothing lasting, so a marker will do
    assert durability.effective_hold() == 13 and not durability.snapshot_due(every_steps=10, interval_s=60)
    assert durability.marker_due(min_interval_s=0.0)
    assert DurablePoint(1, 11, None).covers(1, 11) and not DurablePoint(1, 11, None).covers(1, 12)  # a later retry


def test_commits_stop_at_the_lowest_unfinished_event_or_model_hold_and_never_go_back():
    tp = TopicPartition("t", 0)
    offsets = OffsetTracker()
    for offset in range(10, 15):
        offsets.received(tp, offset)
    for offset in (10, 11, 13, 14):
        offsets.finished(tp, offset)
    assert offsets.to_commit() == {tp: 12}  # 12 is not finished
    assert offsets.to_commit(holds={tp: 11}) == {tp: 11}  # a model still needs 11 re-read after a crash
    offsets.finished(tp, 12)
    assert offsets.to_commit(holds={}) == {tp: 15}
    offsets.committed({tp: 15})
    assert offsets.to_commit(holds={tp: 14}) == {}  # a hold below the committed offset never moves it back
