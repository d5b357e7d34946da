"""The reply door (bus_runtime/reply_door.py): a trainer hands its acknowledged results straight to the gateway
that asked. Over real loopback sockets: what a bell rings arrives byte for byte; a wrong token, a door nobody
listens on, an oversized or broken frame cost nothing but the door; the gateway checks a door's result as it checks
the reply topic's; and through the whole stack the SDK's calls are answered by the door."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import tinker
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types

from bus_events import EventType, make_event, make_result
from bus_events import payloads as p
from bus_events.envelope import encode_event
from bus_events.signing import SIGNATURE_HEADER, sign
from bus_gateway.bus_listener import DOOR, BusListener
from bus_gateway.futures import Future, FutureTable, new_request_id
from bus_runtime.net import free_port
from bus_runtime.reply_door import HELLO, MAX_FRAME_BYTES, OK, Door, DoorBell, DoorServer, door_of
from bus_runtime.settings import open_object_store

pytest_plugins = ["gateway_support", "gateway_stack"]

Record = tuple[bytes, list[tuple[str, bytes]]]


@contextlib.asynccontextmanager
async def open_door() -> AsyncIterator[tuple[DoorServer, asyncio.Queue[Record]]]:
    received: asyncio.Queue[Record] = asyncio.Queue()

    async def deliver(value: bytes, headers: list[tuple[str, bytes]]) -> None:
        received.put_nowait((value, headers))

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
    assert door_of([("other", b"x"), door.header()]) == door
    assert door_of(None) is None
    for raw in (b"", b"127.0.0.1:4242", b"127.0.0.1:0/" + b"ab" * 16, b"127.0.0.1:x/" + b"ab" * 16,
                b"127.0.0.1:4242/short", b":4242/" + b"ab" * 16, b"\xff\xfe"):
        assert Door.parse(raw) is None, raw


async def test_what_a_bell_rings_reaches_the_door_byte_for_byte_and_in_order():
    async with open_door() as (server, received):
        assert server.door is not None
        bell = DoorBell()
        records = [(bytes([i]) * (1000 * i + 1), [(SIGNATURE_HEADER, b"sig%d" % i)]) for i in range(5)]
        for value, headers in records:
            bell.ring(server.door, value, headers)
        got = [await asyncio.wait_for(received.get(), 5) for _ in records]
        await bell.close()
    assert got == records
    assert (bell.rung, bell.skipped, server.frames, server.refused) == (5, 0, 5, 0)


async def test_a_door_with_another_token_is_never_sent_a_result_and_is_left_alone_for_a_while():
    async with open_door() as (server, received):
        assert server.door is not None
        stranger = replace(server.door, token="cd" * 16)  # another gateway's door at this address
        bell = DoorBell()
        bell.ring(stranger, b"result", [])
        await until(lambda: server.refused == 1)
        await until(lambda: stranger not in bell._lines)
        bell.ring(stranger, b"result", [])  # shut after its failure: not even tried
        await bell.close()
        assert received.empty() and server.frames == 0
        assert (bell.rung, bell.skipped) == (1, 1)


async def test_a_door_nobody_listens_on_costs_nothing():
    bell = DoorBell()
    dead = Door("127.0.0.1", free_port(), "ab" * 16)
    bell.ring(dead, b"result", [])  # returns at once: the connect happens on the line's own task
    await until(lambda: dead in bell._shut)
    bell.ring(dead, b"result", [])
    assert bell.skipped == 1
    bell.ring(None, b"a record that named no door", [])  # nothing to do
    await bell.close()


async def test_an_oversized_or_broken_frame_closes_that_connection_only():
    async with open_door() as (server, received):
        assert server.door is not None
        hello = HELLO + server.door.token.encode() + b"\n"
        for frame in ((MAX_FRAME_BYTES + 1).to_bytes(4, "big"), (3).to_bytes(4, "big") + b"\xc1\xc1\xc1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.door.port)
            writer.write(hello)
            assert await reader.readline() == OK
            writer.write(frame)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the door
            writer.close()
        assert server.refused == 2
        bell = DoorBell()
        bell.ring(server.door, b"still open", [])
        assert await asyncio.wait_for(received.get(), 5) == (b"still open", [])
        await bell.close()


def _result_record(fut: Future, key: bytes | None) -> Record:
    """The record a trainer publishes answering `fut`'s optim_step, signed with `key` (None: not signed)."""
    request = make_event(EventType.OPTIM_STEP, p.OptimStep(adam_params=p.AdamParams(learning_rate=1e-3)),
                         model_id=fut.model_id, request_id=fut.request_id, tenant=fut.tenant)
    env, result = make_result(request.env, p.OptimStepResult(metrics={"grad_norm": 1.0}))
    value = encode_event(env, result)
    return value, [(SIGNATURE_HEADER, sign(key, value))] if key is not None else []


async def test_the_gateway_checks_a_door_result_as_it_checks_the_reply_topics(settings):
    signed = replace(settings, reply_key="workers-secret")
    table = FutureTable(ttl_s=60)
    listener = BusListener(signed, table, open_object_store(signed))
    forged = table.add(Future(new_request_id(), "alice", "optim_step", "alice-run:train:0", local=True))
    await listener.handle_direct(*_result_record(forged, None))  # not signed with the workers' key
    await listener.handle_direct(*_result_record(forged, b"another key"))
    assert forged.result is None and listener.unverified[DOOR] == 2 and listener.direct_results == 0
    await listener.handle_direct(*_result_record(forged, b"workers-secret"))
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


async def test_the_sdks_training_calls_are_answered_through_the_door(stack_settings):
    async with running_stack(stack_settings) as url:
        await in_thread(sdk_calls, url, stack_settings.base_models[0])
        async with httpx.AsyncClient(base_url=url) as http:
            gateway = (await http.get("/api/v1/healthz")).json()["components"]["gateway"]
    host, port = gateway["reply_door"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    # create_model, three forward_backward + optim_step pairs; the broker's copies came later and changed nothing
    assert gateway["door_results"] >= 7, gateway


def test_the_door_binds_loopback_only():
    async def bound_host() -> str:
        async with open_door() as (server, _):
            assert server._server is not None
            sock: socket.socket = server._server.sockets[0]
            return sock.getsockname()[0]

    assert asyncio.run(bound_host()) == "127.0.0.1"
