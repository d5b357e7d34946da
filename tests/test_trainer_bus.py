"""The trainer worker against the real Tansu broker and real S3: ordering, dedupe, dead letters, offsets."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

import msgpack
import pytest
import torch
from aiokafka import TopicPartition
from trainer_support import BlockingBackend, BusHarness, adam, bus_settings, datum, fb, random_data

from bus_events import MAX_SEQ_AHEAD, EventType, Topics, encode_event, make_event
from bus_events import payloads as p
from bus_events.signing import SIGNATURE_HEADER, sign
from bus_runtime.kafka_io import make_consumer
from bus_runtime.settings import open_object_store
from bus_runtime.testing import make_tiny_model
from trainer_consumer.config import TrainerConfig

Event = tuple[EventType, object, int]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def training_events(tiny: str, seed: int, data_seed: int, steps: int = 3) -> list[Event]:
    """create, then `steps` x (forward_backward, optim_step), then a named sampler save."""
    events: list[Event] = [(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny, lora=p.LoraSpec(rank=4, seed=seed)),
                            0)]
    for step in range(steps):
        events.append((EventType.FORWARD_BACKWARD, fb(random_data(data_seed * 100 + step, 3)), 2 * step + 1))
        events.append((EventType.OPTIM_STEP, adam(lr=0.02), 2 * step + 2))
    events.append((EventType.SAVE_WEIGHTS_FOR_SAMPLER, p.SaveWeightsForSampler(name="final"), 2 * steps + 1))
    return events


async def publish_all(bus: BusHarness, model_id: str, events: list[Event]) -> list[str]:
    return [await bus.publish(kind, payload, model_id, seq) for kind, payload, seq in events]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fresh_topics(settings, name: str):
    prefix = f"{settings.topics.prefix}-{name}"
    return replace(settings, topics=Topics(prefix=prefix, train_partitions=4, sample_partitions=2,
                                           reply_partitions=2), trainer_group=f"trainers-{prefix}")


async def test_two_adapters_trained_interleaved_end_like_each_trained_alone(settings, tiny):
    base = bus_settings(settings, tiny)
    a_events, b_events = training_events(tiny, seed=1, data_seed=1), training_events(tiny, seed=2, data_seed=2)
    async with BusHarness(base) as bus:
        ids = []
        for a, b in zip(a_events, b_events, strict=True):  # strictly alternating on the bus
            ids += await publish_all(bus, "s:train:0", [a])
            ids += await publish_all(bus, "s:train:1", [b])
        for request_id in ids:
            await bus.ok(request_id)
        together = {m: bus.sampler_weights(m, "final") for m in ("s:train:0", "s:train:1")}
    alone = {}
    for model_id, events in (("s:train:0", a_events), ("s:train:1", b_events)):
        async with BusHarness(_fresh_topics(base, f"alone{model_id[-1]}")) as bus:
            for request_id in await publish_all(bus, f"alone-{model_id}", events):
                await bus.ok(request_id)
            alone[model_id] = bus.sampler_weights(f"alone-{model_id}", "final")
    assert not _same(together["s:train:0"], together["s:train:1"])
    for model_id in together:
        assert _same(together[model_id], alone[model_id]), f"{model_id} differs when trained next to another adapter"


async def test_shuffled_delivery_and_duplicates_give_the_in_order_result(settings, tiny):
    events = training_events(tiny, seed=5, data_seed=5)
    shuffled = events[:]
    random.Random(3).shuffle(shuffled)
    if shuffled[0][2] == 0:  # make sure the model's create_model does not arrive first
        shuffled.append(shuffled.pop(0))
    async with BusHarness(bus_settings(settings, tiny)) as bus:
        in_order = await publish_all(bus, "ordered", events)
        mixed = await publish_all(bus, "shuffled", shuffled)
        # Duplicates: the very same event twice (same request_id), and an SDK-style retry (new request_id).
        fb_kind, fb_payload, fb_seq = events[1]
        env_ids = [await bus.publish(fb_kind, fb_payload, "shuffled", fb_seq) for _ in range(2)]
        same_id = await bus.publish(fb_kind, fb_payload, "shuffled", fb_seq, request_id=env_ids[0])
        for request_id in in_order + mixed + env_ids + [same_id]:
            await bus.ok(request_id)
        ordered_results = [bus.replies[r][0].result for r in in_order]
        by_seq = {seq: bus.replies[r][0].result for (_, _, seq), r in zip(shuffled, mixed, strict=True)}
        assert [by_seq[seq] for _, _, seq in events][1:-1] == ordered_results[1:-1]  # same losses, same metrics
        first = by_seq[fb_seq]
        assert all(bus.replies[r][-1].result == first for r in env_ids)
        info = await bus.ok(await bus.publish(EventType.GET_INFO, p.GetInfo(), "shuffled", len(events)))
        assert info["step"] == 3  # three optim_steps, each applied once
        assert _same(bus.sampler_weights("ordered", "final"), bus.sampler_weights("shuffled", "final"))


async def test_poisoned_events_are_dead_lettered_and_the_consumer_carries_on(settings, tiny):
    async with BusHarness(bus_settings(settings, tiny)) as bus:
        created = await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "m", 0)
        await bus.publish_raw(b"\xc1 this is not msgpack", "m")
        await bus.publish_raw(msgpack.packb({"v": 99, "type": "get_info", "request_id": "old-client", "model_id": "m",
                                             "seq_id": 1, "payload": {}}), "m")
        await bus.publish_raw(msgpack.packb({"v": 1, "type": "forward_backward", "request_id": "no-data",
                                             "model_id": "m", "seq_id": 1, "payload": {"loss_fn": "cross_entropy"}}),
                              "m")
        after = await bus.publish(EventType.FORWARD_BACKWARD, fb([datum([1, 2, 3, 4])]), "m", 2)
        step = await bus.publish(EventType.OPTIM_STEP, adam(), "m", 3)
        await bus.ok(created)
        assert (await bus.reply(after, timeout=20)).error is None  # seq 1 was voided by its dead letter: no wait
        await bus.wait_for(lambda: len(bus.dead_letters) >= 3)
        reasons = sorted(dl.reason for _, dl in bus.dead_letters)
        assert any("not msgpack" in r for r in reasons)
        assert any("unsupported schema version v=99" in r for r in reasons)
        assert any("data" in r and "forward_backward" in r for r in reasons)
        assert {dl.stage for _, dl in bus.dead_letters} == {"decode", "validate"}
        assert all(dl.source_topic == bus.settings.topics.train for _, dl in bus.dead_letters)
        assert (await bus.reply("no-data")).error.category == "user"
        assert (await bus.reply("old-client")).error is not None
        refused = await bus.reply(step)  # the dead-lettered forward_backward failed its gradient window
        assert refused.error is not None and "seq_id 1" in refused.error.message


async def test_offsets_are_committed_only_for_finished_events(settings, tiny):
    config = TrainerConfig(gap_timeout_s=600)
    s = bus_settings(settings, tiny)
    async with BusHarness(s, config) as bus:
        await bus.ok(await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "m", 0))
        waiting = await bus.publish(EventType.GET_INFO, p.GetInfo(), "m", 2)  # seq 1 is missing: it must wait
        probe = make_consumer(s, group_id=s.trainer_group)
        await probe.start()
        try:
            partitions = [TopicPartition(s.topics.train, i) for i in range(s.topics.train_partitions)]

            async def committed() -> int:
                return sum([(await probe.committed(tp)) or 0 for tp in partitions])

            deadline = time.monotonic() + 10
            while await committed() < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await committed() == 1  # create_model only; the waiting get_info is not finished
            await asyncio.sleep(0.5)
            assert await committed() == 1 and waiting not in bus.replies
            await bus.ok(await bus.publish(EventType.GET_INFO, p.GetInfo(), "m", 1))
            await bus.ok(waiting)
            deadline = time.monotonic() + 10
            while await committed() < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await committed() == 3
        finally:
            await probe.stop()


async def test_a_long_compute_step_keeps_the_group_and_other_models_answered(settings, tiny, caplog):
    """The device thread is busy for twice the session timeout; the asyncio loop keeps heart-beating."""
    caplog.set_level(logging.INFO, logger="trainer_consumer.worker")
    s = bus_settings(settings, tiny)
    assert s.session_timeout_ms <= 3000
    backend = BlockingBackend("busy")
    async with BusHarness(s, backend=backend) as bus:  # type: ignore[arg-type]
        for model_id in ("busy", "idle"):
            await bus.ok(await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), model_id, 0))
        slow = await bus.publish(EventType.FORWARD_BACKWARD, fb(random_data(9, 2)), "busy", 1)
        try:
            assert await asyncio.to_thread(backend.entered.wait, 60)  # the compute thread is now blocked
            started = time.monotonic()
            info = await bus.ok(await bus.publish(EventType.GET_INFO, p.GetInfo(), "idle", 1))
            assert info["model_id"] == "idle" and slow not in bus.replies  # answered while the step still runs
            await asyncio.sleep(2 * s.session_timeout_ms / 1000 - (time.monotonic() - started))
            assert slow not in bus.replies
        finally:
            backend.release.set()
        await bus.ok(slow)
        after = await bus.ok(await bus.publish(EventType.GET_INFO, p.GetInfo(), "idle", 2))
        assert after["model_id"] == "idle"
        assert bus.replies[slow][0].error is None and len(bus.replies[slow]) == 1
    assignments = [r for r in caplog.records if r.getMessage().startswith("trainer assigned")]
    assert len(assignments) == 1, "the group rebalanced during the long step"


async def test_claim_checked_requests_and_results_travel_through_s3(settings, tiny):
    from bus_events import decode_envelope, encode_event, make_event

    s = bus_settings(settings, tiny, claim_check_bytes=4096)
    data = random_data(3, 6, lengths=(60, 80))
    async with BusHarness(s) as bus:
        await bus.ok(await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "m", 0))
        big = await bus.publish(EventType.FORWARD_BACKWARD, fb(data, forward_only=True), "m", 1)
        result = await bus.ok(big)  # the reply is bigger than 4 KiB too: it came back through a claim check
        assert [o["logprobs"]["shape"] for o in result["outputs"]] == [[int(d.tokens.shape[0])] for d in data]
        # A claim check whose blob is gone: dead-lettered with the reason, the model's seq_id voided.
        env, body = make_event(EventType.FORWARD_BACKWARD, fb(data), model_id="m", seq_id=2)
        objects = open_object_store(s)
        raw = encode_event(env, body, blob_store=objects, claim_check_bytes=s.claim_check_bytes)
        objects.delete(decode_envelope(raw).payload_ref.key)
        await bus.publish_raw(raw, "m")
        lost = await bus.reply(env.request_id)
        assert lost.error is not None and "payload unreadable" in lost.error.message
        assert (await bus.reply(await bus.publish(EventType.GET_INFO, p.GetInfo(), "m", 3), timeout=20)).error is None


async def test_a_huge_seq_id_jump_costs_one_void_and_never_stalls_other_models(settings, tiny, caplog):
    """Issue 20 item 7: a tenant's absurd seq_id (2**62) must not kill the gap timer that every model relies on,
    a big gap is voided as one range, and another tenant's model with a gap of one is answered meanwhile."""
    config = TrainerConfig(gap_timeout_s=0.5)
    caplog.set_level(logging.ERROR, logger="trainer_consumer.stream")
    async with BusHarness(bus_settings(settings, tiny), config) as bus:
        await bus.ok(await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "abuser", 0))
        await bus.ok(await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), "victim", 0))
        absurd = await bus.publish(EventType.OPTIM_STEP, adam(), "abuser", 2**62)
        far = await bus.publish(EventType.GET_INFO, p.GetInfo(), "abuser", MAX_SEQ_AHEAD)
        victim = await bus.publish(EventType.GET_INFO, p.GetInfo(), "victim", 2)  # seq 1 never comes
        assert (await bus.reply(victim, timeout=30)).error is None
        assert (await bus.reply(far, timeout=30)).error is None
        refused = await bus.reply(absurd)
        assert refused.error is not None and f"more than {MAX_SEQ_AHEAD} ahead" in refused.error.message
        voids = [r.getMessage() for r in caplog.records if "never arrived" in r.getMessage()]
        assert len(voids) == 2 and any(f"seq_ids 1..{MAX_SEQ_AHEAD - 1}" in v for v in voids)
        after = await bus.publish(EventType.GET_INFO, p.GetInfo(), "abuser", MAX_SEQ_AHEAD + 1)
        assert (await bus.reply(after, timeout=30)).error is None


async def test_with_tenant_keys_only_events_signed_by_their_tenant_are_applied(settings, tiny):
    """Issue 20 item 8: a producer that can reach the broker cannot act as another tenant. Forged and unsigned
    events are dead-lettered; they neither get answered nor void the tenant's seq_ids."""
    keys = "alice=alice-secret,bob=bob-secret"
    signed = bus_settings(settings, tiny, event_keys=keys)
    async with BusHarness(signed) as bus:

        async def send(kind, payload, seq, tenant, key: bytes | None) -> str:
            env, body = make_event(kind, payload, model_id="alice:train:0", seq_id=seq, tenant=tenant)
            raw = encode_event(env, body, claim_check_bytes=signed.claim_check_bytes)
            headers = [(SIGNATURE_HEADER, sign(key, raw))] if key else None
            await bus.producer.send_and_wait(signed.topics.train, raw, key=b"alice:train:0", headers=headers)
            return env.request_id

        create = await send(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny), 0, "alice", b"alice-secret")
        await bus.ok(create)
        forged = await send(EventType.GET_INFO, p.GetInfo(), 1, "alice", b"bob-secret")  # bob's key, alice's name
        unsigned = await send(EventType.GET_INFO, p.GetInfo(), 1, "alice", None)
        genuine = await send(EventType.GET_INFO, p.GetInfo(), 1, "alice", b"alice-secret")
        assert (await bus.ok(genuine))["model_id"] == "alice:train:0"  # seq 1 was not voided by the forgeries
        await bus.wait_for(lambda: len(bus.dead_letters) >= 2)
        assert all("claims tenant 'alice'" in dl.reason for _, dl in bus.dead_letters)
        assert forged not in bus.replies and unsigned not in bus.replies
