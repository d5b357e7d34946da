"""Doors (bus_runtime/doors.py): a part hands an acknowledged record straight to its next reader. Over real
loopback sockets: what a bell rings arrives byte for byte and in order; a wrong token, a door nobody listens on, an
oversized or broken frame cost nothing but the door; the gateway checks a door's result as it checks the reply
topic's; and through the whole stack the SDK's requests reach the trainer and its results come back by the doors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import httpx
import msgspec
import pytest
import tinker
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types
from trainer_support import BusHarness, bus_settings

import trainer_consumer.worker as worker_module
from bus_events import EventType, make_event, make_result
from bus_events import payloads as p
from bus_events.envelope import encode_event
from bus_events.signing import SIGNATURE_HEADER, sign
from bus_gateway.bus_listener import DOOR, BusListener
from bus_gateway.futures import Future, FutureTable, new_request_id
from bus_gateway.intake_doors import IntakeDoors
from bus_runtime.doors import (
    EARLY_KEPT,
    MAX_FRAME_BYTES,
    OK,
    UNACKED,
    Acked,
    BusRecord,
    Door,
    DoorBell,
    DoorServer,
    Dropped,
    Early,
    reply_door_of,
    settled_record,
)
from bus_runtime.health import read_health
from bus_runtime.kafka_io import ensure_topics, make_producer, publish
from bus_runtime.net import free_port
from bus_runtime.settings import open_object_store
from trainer_consumer.config import TrainerConfig
from trainer_consumer.handed import HandedMismatch

pytest_plugins = ["gateway_support", "gateway_stack"]



def record(value: bytes, headers: list[tuple[str, bytes]] | None = None, offset: int = 0) -> BusRecord:
    return BusRecord(value, headers or [], "tinker-bus.train", 3, offset, b"model")


def at(handed: BusRecord, offset: int) -> BusRecord:
    return msgspec.structs.replace(handed, offset=offset)


@contextlib.asynccontextmanager
async def open_door() -> AsyncIterator[tuple[DoorServer, asyncio.Queue[BusRecord]]]:
    received: asyncio.Queue[BusRecord] = asyncio.Queue()

    async def deliver(handed: BusRecord) -> None:
        received.put_nowait(handed)

    server = DoorServer("127.0.0.1", deliver)
    await server.start()
    try:
        yield server, received
    finally:
        await server.stop()


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def test_a_door_header_names_its_door_and_nothing_else_names_one():
    door = Door("127.0.0.1", 4242, "ab" * 16)
    assert reply_door_of([("other", b"x"), door.header()]) == door
    assert reply_door_of(None) is None
    assert Door.parse(door.spec) == door  # as a heartbeat names it
    for raw in (b"", b"127.0.0.1:4242", b"127.0.0.1:0/" + b"ab" * 16, b"127.0.0.1:x/" + b"ab" * 16,
                b"127.0.0.1:4242/short", b":4242/" + b"ab" * 16, b"\xff\xfe"):
        assert Door.parse(raw) is None, raw


async def test_what_a_bell_rings_reaches_the_door_byte_for_byte_and_in_order():
    async with open_door() as (server, received):
        assert server.door is not None
        bell = DoorBell()
        records = [record(bytes([i]) * (1000 * i + 1), [(SIGNATURE_HEADER, b"sig%d" % i)], i) for i in range(5)]
        for handed in records:
            bell.ring(server.door, handed)
        got = [await asyncio.wait_for(received.get(), 5) for _ in records]
        await bell.close()
    assert got == records
    assert (bell.rung, bell.skipped, server.frames, server.refused) == (5, 0, 5, 0)


async def test_an_announced_record_is_delivered_once_acknowledged_and_a_dropped_one_never():
    async with open_door() as (server, received):
        assert server.door is not None
        bell = DoorBell()
        first, second, third = (record(bytes([i]) * 70_000, [(SIGNATURE_HEADER, b"sig")], UNACKED) for i in range(3))
        tickets = [bell.announce(server.door, early) for early in (first, second, third)]
        assert all(ticket is not None for ticket in tickets)
        bell.ring(server.door, record(b"marker", [], 1))  # frames arrive in order: the three early ones came first
        assert await asyncio.wait_for(received.get(), 5) == record(b"marker", [], 1)
        assert received.empty() and server.frames == 1  # nothing announced is delivered before its ack
        bell.settle(tickets[1], at(second, 7))  # acks come in the broker's order, not the announcing one
        bell.settle(tickets[0], None)  # its produce failed
        bell.settle(tickets[2], at(third, 8))
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
        await bell.close()
    assert got == [at(second, 7), at(third, 8)]  # byte for byte, at their offsets
    assert (bell.announced, bell.rung, bell.skipped, server.frames) == (3, 3, 0, 3)


async def test_a_door_shows_an_announced_record_as_its_bytes_arrive_and_delivers_it_at_its_ack():
    seen: list[tuple[str, BusRecord]] = []

    async def deliver(handed: BusRecord) -> None:
        seen.append(("delivered", handed))

    server = DoorServer("127.0.0.1", deliver, preview=lambda early: seen.append(("previewed", early)))
    await server.start()
    assert server.door is not None
    bell = DoorBell()
    early = record(b"step" * 10_000, [(SIGNATURE_HEADER, b"sig")], UNACKED)
    ticket = bell.announce(server.door, early)
    assert ticket is not None
    await until(lambda: len(seen) == 1)
    bell.settle(ticket, at(early, 12))
    await until(lambda: len(seen) == 2)
    await bell.close()
    await server.stop()
    assert seen == [("previewed", early), ("delivered", at(early, 12))]


def test_a_door_delivers_only_what_an_early_frame_and_its_ack_make_whole():
    early: dict[int, Early] = {}
    held = Early(1, b"v", [], "tinker-bus.train", 3, b"model")
    assert settled_record(held, early) is None and early == {1: held}
    assert settled_record(Acked(2, 3, 5), early) is None  # an ack of nothing held (its early frame never came)
    assert settled_record(Acked(1, 4, 5), early) is None and not early  # acknowledged elsewhere: left to the fetch
    settled_record(held, early)
    assert settled_record(Dropped(1), early) is None and not early
    settled_record(held, early)
    assert settled_record(Acked(1, 3, 5), early) == BusRecord(b"v", [], "tinker-bus.train", 3, 5, b"model")
    for ticket in range(EARLY_KEPT + 1):  # acks lost with a full queue never pile up
        settled_record(msgspec.structs.replace(held, ticket=ticket), early)
    assert len(early) == EARLY_KEPT and 0 not in early


async def test_a_record_is_announced_on_the_partition_the_broker_then_acknowledges(settings):
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        announced: list[BusRecord] = []
        for i in range(6):
            env, body = make_event(EventType.GET_INFO, p.GetInfo(), model_id=f"m{i}:train:0", seq_id=1)
            sent = await publish(producer, settings.topics.train, env, body,
                                 claim_check_bytes=settings.claim_check_bytes, announce=announced.append)
            if announced and announced[-1].offset == UNACKED:  # announced: the topic's metadata was known
                assert at(announced[-1], sent.offset) == sent
                announced[-1] = sent
    finally:
        await producer.stop()
    assert len(announced) >= 5  # every send after the first knows the topic's partitions


async def test_a_stopped_door_lets_its_open_connections_end_instead_of_cancelling_them():
    # A connection task cancelled at the loop's end makes Python 3.11's asyncio log a traceback per connection.
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    bell = DoorBell()
    async with open_door() as (server, received):
        assert server.door is not None
        bell.ring(server.door, record(b"x", [], 0))
        await asyncio.wait_for(received.get(), 5)
        serving = set(server._serving)
    assert len(serving) == 1 and all(task.done() and not task.cancelled() for task in serving)
    assert not server._serving and not errors
    await bell.close()


async def test_a_door_with_another_token_is_never_sent_a_result_and_is_left_alone_for_a_while():
    async with open_door() as (server, received):
        assert server.door is not None
        stranger = replace(server.door, token="cd" * 16)  # another gateway's door at this address
        bell = DoorBell()
        bell.ring(stranger, record(b"result"))
        await until(lambda: server.refused == 1)
        await until(lambda: stranger not in bell._lines)
        bell.ring(stranger, record(b"result"))  # shut after its failure: not even tried
        await bell.close()
        assert received.empty() and server.frames == 0
        assert (bell.rung, bell.skipped) == (1, 1)


async def test_a_door_nobody_listens_on_costs_nothing():
    bell = DoorBell()
    dead = Door("127.0.0.1", free_port(), "ab" * 16)
    bell.ring(dead, record(b"result"))  # returns at once: the connect happens on the line's own task
    await until(lambda: dead in bell._shut)
    bell.ring(dead, record(b"result"))
    assert bell.skipped == 1
    bell.ring(None, record(b"a record that named no door"))  # nothing to do
    await bell.close()


async def test_an_oversized_or_broken_frame_closes_that_connection_only():
    async with open_door() as (server, received):
        assert server.door is not None
        hello = server.door.hello
        for frame in ((MAX_FRAME_BYTES + 1).to_bytes(4, "big"), (3).to_bytes(4, "big") + b"\xc1\xc1\xc1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.door.port)
            writer.write(hello)
            assert await reader.readline() == OK
            writer.write(frame)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the door
            writer.close()
        assert server.refused == 2
        bell = DoorBell()
        bell.ring(server.door, record(b"still open"))
        assert await asyncio.wait_for(received.get(), 5) == record(b"still open")
        await bell.close()


def _result_record(fut: Future, key: bytes | None) -> BusRecord:
    """The record a trainer publishes answering `fut`'s optim_step, signed with `key` (None: not signed)."""
    request = make_event(EventType.OPTIM_STEP, p.OptimStep(adam_params=p.AdamParams(learning_rate=1e-3)),
                         model_id=fut.model_id, request_id=fut.request_id, tenant=fut.tenant)
    env, result = make_result(request.env, p.OptimStepResult(metrics={"grad_norm": 1.0}))
    value = encode_event(env, result)
    return record(value, [(SIGNATURE_HEADER, sign(key, value))] if key is not None else [])


async def test_the_gateway_checks_a_door_result_as_it_checks_the_reply_topics(settings):
    signed = replace(settings, reply_key="workers-secret")
    table = FutureTable(ttl_s=60)
    listener = BusListener(signed, table, open_object_store(signed))
    forged = table.add(Future(new_request_id(), "alice", "optim_step", "alice-run:train:0", local=True))
    await listener.handle_direct(_result_record(forged, None))  # not signed with the workers' key
    await listener.handle_direct(_result_record(forged, b"another key"))
    assert forged.result is None and listener.unverified[DOOR] == 2 and listener.direct_results == 0
    await listener.handle_direct(_result_record(forged, b"workers-secret"))
    assert forged.result is not None and forged.result.error is None and listener.direct_results == 1


def sdk_calls(url: str, base_model: str) -> None:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=1).result()
    data = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})]
    for _ in range(3):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    service.close("success").result()


async def test_the_sdks_requests_and_results_go_by_the_doors(stack_settings):
    async with running_stack(stack_settings) as url, httpx.AsyncClient(base_url=url) as http:
        async def trainer_names_its_door() -> bool:
            trainers = (await http.get("/api/v1/healthz")).json()["components"]["trainer"]["detail"]
            return bool(trainers) and trainers[0]["intake_door"] is not None and bool(trainers[0]["partitions"])

        async with asyncio.timeout(30):  # in a heartbeat after it opened (the gateway reads them as it publishes)
            while not await trainer_names_its_door():
                await asyncio.sleep(0.2)
        await in_thread(sdk_calls, url, stack_settings.base_models[0])
        deadline = asyncio.get_running_loop().time() + 15  # the next heartbeats tell what the trainer took
        while True:
            components = (await http.get("/api/v1/healthz")).json()["components"]
            gateway, (trainer,) = components["gateway"], components["trainer"]["detail"]
            if trainer["handed"]["taken"] or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
    host, port = gateway["reply_door"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    # create_model, then three forward_backward + optim_step pairs: every result came by the reply door (the
    # broker's copies changed nothing), and the trainer took requests from its door (all but the partition's
    # first, which tells it where the partition stands)
    assert gateway["door_results"] >= 7, gateway
    assert gateway["intake_doors"] == stack_settings.topics.all()[stack_settings.topics.train], gateway
    # their bytes went ahead of the broker's ack, and the ack followed each (the door knew the partition by then)
    handed = gateway["intake_handed"]
    assert handed["announced"] >= 6 and handed["rung"] == handed["announced"] and not handed["skipped"], gateway
    assert Door.parse(trainer["intake_door"]) is not None, trainer
    assert trainer["handed"]["taken"] >= 1, trainer
    assert trainer["handed"]["previewed"] >= 1, trainer  # decoded from the announced bytes, before the ack came


def test_the_door_binds_loopback_only():
    async def bound_host() -> str:
        async with open_door() as (server, _):
            assert server._server is not None
            sock: socket.socket = server._server.sockets[0]
            return sock.getsockname()[0]

    assert asyncio.run(bound_host()) == "127.0.0.1"


async def trainer_door(settings) -> Door:
    """The intake door the running trainer names in its heartbeat (written every HEARTBEAT_INTERVAL_S), as a
    gateway reads it."""
    doors = IntakeDoors(open_object_store(settings))
    async with asyncio.timeout(30):
        while not (known := await asyncio.to_thread(doors.read)):
            await asyncio.sleep(0.2)
    (door,) = set(known.values())
    return door


async def test_a_handed_request_the_log_does_not_hold_stops_the_trainer(settings, tiny_model):
    # Fetches that wait 500 ms (Tansu never cuts them short): the handed copy is always there first.
    slow = bus_settings(settings, tiny_model, fetch_max_wait_ms=500, fetch_busy_wait_ms=500)
    model_id = "forge:train:0"
    async with BusHarness(slow) as bus:  # the default TrainerConfig: a door on 127.0.0.1
        door = await trainer_door(slow)
        created = await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny_model,
                                                                          lora=p.LoraSpec(rank=4)), model_id, 0)
        await bus.ok(created)  # the trainer now knows where the model's partition stands
        env, body = make_event(EventType.GET_INFO, p.GetInfo(), model_id=model_id, seq_id=1)
        real = await publish(bus.producer, slow.topics.train, env, body, claim_check_bytes=slow.claim_check_bytes)
        forged = msgspec.structs.replace(env, request_id="req-forged")
        bell = DoorBell()
        bell.ring(door, msgspec.structs.replace(real, value=encode_event(forged, body)))
        async with asyncio.timeout(30):  # taken in as the log's record at that offset (the only way to a mismatch),
            await asyncio.wait({bus.worker})  # until the fetched copy showed it was not
        await bell.close()
        stopped, bus.worker = bus.worker, asyncio.create_task(asyncio.sleep(0))  # the harness still closes the rest
    with pytest.raises(HandedMismatch, match="is not the log's record at that offset"):
        stopped.result()


async def trainer_detail(settings, ready: Callable[[dict], bool]) -> dict:
    """The running trainer's heartbeat detail, once one is `ready` (heartbeats come every HEARTBEAT_INTERVAL_S)."""
    async with asyncio.timeout(30):
        while not (docs := [w.detail for w in await asyncio.to_thread(read_health, open_object_store(settings))
                            if w.role == "trainer" and ready(w.detail)]):
            await asyncio.sleep(0.2)
    return docs[0]


async def test_a_request_the_door_did_not_bring_quickens_the_trainers_fetch(settings, tiny_model, monkeypatch):
    # A direct producer's requests come only by the fetch: after one, the trainer fetches with the short wait for
    # a while (here: all of the test), as it does without a door; before any, with the configured long one.
    monkeypatch.setattr(worker_module, "SESSION_FAST_S", 600.0)
    slow = bus_settings(settings, tiny_model, fetch_max_wait_ms=500, fetch_busy_wait_ms=2)
    async with BusHarness(slow) as bus:  # the default TrainerConfig: an intake door
        assert (await trainer_detail(slow, lambda detail: "fetch_wait_ms" in detail))["fetch_wait_ms"] == 500
        created = await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny_model,
                                                                          lora=p.LoraSpec(rank=4)), "direct:train:0", 0)
        await bus.ok(created)
        await trainer_detail(slow, lambda detail: detail.get("fetch_wait_ms") == 2)  # a next heartbeat


async def test_without_an_intake_door_the_trainer_names_none_and_reads_the_log(settings, tiny_model):
    async with BusHarness(bus_settings(settings, tiny_model), TrainerConfig(intake_door_host="")) as bus:
        created = await bus.publish(EventType.CREATE_MODEL, p.CreateModel(base_model=tiny_model,
                                                                          lora=p.LoraSpec(rank=4)), "plain:train:0", 0)
        await bus.ok(created)
        detail = await trainer_detail(settings, lambda detail: bool(detail.get("partitions")))
    assert detail["intake_door"] is None and detail["handed"] == {"taken": 0, "passed": 0, "previewed": 0}
