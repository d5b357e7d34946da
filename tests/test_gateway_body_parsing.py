"""Big JSON bodies are parsed off the event loop (bus_gateway/body_parsing.py, issue 20 item 4): while the gateway
parses a ~60 MB /fwdbwd or /api/v1/asample body, its event loop keeps turning (and /healthz is served). The gateway
runs under uvicorn on the real bus and S3 in the test's own loop; an ASGI wrapper only tells the test when the server
has received the whole big body. No timing: the loop's turns are counted.

Before the fix the parse ran in one call on the loop (a thread would not do: msgspec holds the GIL for a whole
decode call), so the loop did not turn while the body was parsed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from gateway_support import FAST

import bus_gateway.body_parsing as body_parsing
from bus_gateway.body_parsing import decode_in_pieces
from bus_gateway.json_api.schemas import JsonForwardBackward, JsonSample
from bus_gateway.server import make_server
from bus_gateway.tinker_api.schemas import SampleRequest
from bus_runtime.net import free_port

pytest_plugins = ["gateway_support"]

BIG_BYTES = 60 << 20
HEADERS = {"X-API-Key": "tml-dev", "Content-Type": "application/json"}


def watching(app: Any, path: str, received: asyncio.Event) -> Any:
    """`app`, setting `received` once a request to `path` has handed the app the last chunk of its body."""

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope.get("path") != path:
            return await app(scope, receive, send)

        async def watched_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                received.set()
            return message

        return await app(scope, watched_receive, send)

    return wrapped


@contextlib.asynccontextmanager
async def gateway(settings, path: str, received: asyncio.Event) -> AsyncIterator[str]:
    port = free_port()
    server = make_server(settings, api_keys=None, port=port, config=FAST, log_level="warning")
    server.config.app = watching(server.config.app, path, received)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the gateway did not start"
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def _fwdbwd_body() -> bytes:
    """A /fwdbwd body of about BIG_BYTES whose very last message breaks the schema (role "")."""
    conversation = [{"role": "user", "content": "tell me more " * 40}, {"role": "assistant", "content": "ok " * 60}]
    count = BIG_BYTES // len(json.dumps(conversation))
    data = [conversation] * count + [[{"role": "", "content": "x"}]]
    return json.dumps({"model_id": "big-model", "data": data}).encode()


def _asample_body() -> bytes:
    """An /api/v1/asample body of about BIG_BYTES of prompt tokens whose very last token is not a number."""
    tokens = ",".join(["12345"] * (BIG_BYTES // 6))
    return (b'{"sampling_session_id": "s:sample:0", "sampling_params": {"max_tokens": 1}, '
            b'"prompt": {"chunks": [{"type": "encoded_text", "tokens": [' + tokens.encode() + b',"x"]}]}}')


@pytest.mark.parametrize("route,body,field", [
    ("/fwdbwd", _fwdbwd_body, "data[{n}][0].role"),
    ("/api/v1/asample", _asample_body, "prompt.chunks[0].tokens[{n}]"),
])
async def test_the_event_loop_keeps_turning_while_a_big_body_is_parsed(gw_settings, route, body, field):
    raw = body()
    received = asyncio.Event()
    done = asyncio.Event()
    ticks = 0
    async with gateway(gw_settings, route, received) as url, httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def big() -> httpx.Response:
            try:
                return await client.post(route, content=raw, headers=HEADERS)
            finally:
                done.set()

        async def ticker() -> None:  # the gateway shares this loop: each turn is one it could serve
            nonlocal ticks
            await received.wait()  # the server holds the whole body: it parses it now
            while not done.is_set():
                await asyncio.sleep(0)
                ticks += 1

        async def health() -> int:  # served meanwhile (its S3 reads compete for the GIL: no order asserted)
            await received.wait()
            return (await client.get("/healthz")).status_code

        refused, _, health_status = await asyncio.gather(big(), ticker(), health())
    assert refused.status_code == 400, refused.text[:300]
    last = len(json.loads(raw)["data"]) - 1 if route == "/fwdbwd" else BIG_BYTES // 6  # the bad one
    assert refused.json()["field"] == field.format(n=last)
    assert health_status in (200, 503)
    # Parsed in one call (on the loop, or in a thread: msgspec holds the GIL for the whole call) the loop turned
    # once or twice in all; parsed in pieces it turns between them.
    assert ticks >= 10, ticks


BODIES = [
    (SampleRequest, {"sampling_session_id": "s:sample:0", "seq_id": 0, "num_samples": 1,
                     "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(range(300))}]},
                     "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0}}),
    (JsonForwardBackward, {"model_id": "m", "seq_id": 3, "data": [[{"role": "user", "content": "hi " * 30},
                                                                    {"role": "assistant", "content": "yo"}]] * 5}),
    (JsonSample, {"prompt": list(range(200)), "max_tokens": 3}),
]


def _broken(body: dict, path: list, value: Any) -> dict:
    copy = json.loads(json.dumps(body))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


@pytest.mark.parametrize("body_type,body,path,value", [
    (SampleRequest, BODIES[0][1], None, None),
    (SampleRequest, BODIES[0][1], ["prompt", "chunks", 0, "tokens", 250], "x"),
    (SampleRequest, BODIES[0][1], ["prompt", "chunks", 0, "type"], "nope"),
    (SampleRequest, BODIES[0][1], ["sampling_params"], KeyError),
    (SampleRequest, BODIES[0][1], ["sampling_params", "top_p"], "high"),
    (JsonForwardBackward, BODIES[1][1], None, None),
    (JsonForwardBackward, BODIES[1][1], ["data", 4, 1, "role"], ""),
    (JsonForwardBackward, BODIES[1][1], ["data"], []),
    (JsonSample, BODIES[2][1], None, None),
    (JsonSample, BODIES[2][1], ["prompt", 150], -1.5),
])
def test_a_body_decoded_in_pieces_is_what_one_decode_gives(monkeypatch, body_type, body, path, value):
    """Same struct, or the same error at the same field, as msgspec's one-call decode (pieces forced tiny)."""
    monkeypatch.setattr(body_parsing, "PIECE_BYTES", 32)
    raw = json.dumps(body if path is None else _broken(body, path, value)).encode()
    try:
        expected: Any = msgspec.json.decode(raw, type=body_type, strict=False)
    except msgspec.ValidationError as exc:
        expected = str(exc)
    try:
        got: Any = decode_in_pieces(raw, body_type)
    except body_parsing._PieceError as exc:
        got = exc.message()
    if isinstance(expected, str):
        assert got.split(" - at ")[0] == expected.split(" - at ")[0]
        assert got.split(" - at ")[-1] == expected.split(" - at ")[-1] or " - at " not in expected
    else:
        assert got == expected
