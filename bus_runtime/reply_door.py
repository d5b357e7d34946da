"""The reply door: a trainer hands a result it has just published straight to the gateway that asked for it, so
that gateway need not wait for its next fetch of the reply topic (issue 14).

Tansu never wakes a fetch early (fetch_pacing.py): the gateway's bus listener sees a result at its next fetch, on
top of the produce, and a client calling one step at a time pays that on every call. The door removes that wait;
it does not replace the log:
- a worker rings only after the broker acknowledged the reply, so what a client is told is in the log; the
  gateway checks a record from the door exactly as one read from the reply topic (its signature included), and the
  copy it reads there later changes nothing (the first result of a future counts);
- all of it is best effort: a door that cannot be reached, answers with another token, or lags is skipped for a
  while, and its results come through the reply topic as they always did.

A gateway opens its door on a host its trainers reach (127.0.0.1 by default) and stamps every training request it
publishes with the header `tb-reply-door: host:port/token`. The token, random per gateway process, keeps a worker
from talking to anything else on that port: a gateway on another machine whose door says 127.0.0.1 is not reached
at all, since whatever listens there never answers `ok` to the token.

Wire (TCP): the worker sends `tinker-bus-reply-door/1 <token>\\n`, the gateway answers `ok\\n` if the token is its
own (else it closes), then the worker sends frames: a 4-byte big-endian length, then msgpack [value, headers] of the
record it published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec

log = logging.getLogger(__name__)

HEADER = "tb-reply-door"
HELLO = b"tinker-bus-reply-door/1 "
OK = b"ok\n"
MAX_FRAME_BYTES = 64 << 20  # a result bigger than this travels in the claim-check store, not in the record
HANDSHAKE_TIMEOUT_S = 1.0
RETRY_AFTER_S = 30.0  # how long a door that failed is left alone
QUEUED_FRAMES = 1024  # per door; beyond this a lagging door drops results (the reply topic still has them)
_TOKEN = re.compile(r"[0-9a-f]{32}")

Headers = list[tuple[str, bytes]]
Deliver = Callable[[bytes, Headers], Awaitable[None]]
_FRAME = msgspec.msgpack.Decoder(tuple[bytes, list[tuple[str, bytes]]])
_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True)
class Door:
    host: str
    port: int
    token: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def header(self) -> tuple[str, bytes]:
        return HEADER, f"{self.address}/{self.token}".encode()

    @classmethod
    def parse(cls, raw: bytes | None) -> Door | None:
        """The door a header names; None for anything else (a forged one costs at most one failed handshake)."""
        try:
            address, token = (raw or b"").decode("ascii").rsplit("/", 1)
            host, port = address.rsplit(":", 1)
            door = cls(host.strip("[]"), int(port), token)
        except (ValueError, UnicodeDecodeError):
            return None
        return door if door.host and 0 < door.port < 65536 and _TOKEN.fullmatch(token) else None


def door_of(headers: Iterable[tuple[str, bytes]] | None) -> Door | None:
    """The reply door a record's headers name, if any."""
    return next((Door.parse(value) for key, value in headers or () if key == HEADER), None)


class DoorServer:
    """The gateway's side: accepts the results workers hand over and passes them to `deliver`."""

    def __init__(self, host: str, deliver: Deliver):
        self.host = host
        self.deliver = deliver
        self.token = secrets.token_hex(16)
        self.door: Door | None = None  # once started
        self.frames = 0  # results handed over
        self.refused = 0  # connections closed for a wrong token, an oversized or broken frame
        self._server: asyncio.Server | None = None
        self._peers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.door = Door(self.host, port, self.token)
        log.info("reply door open on %s:%d", self.host, port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._peers):  # since 3.12 wait_closed also waits for the open connections
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._peers.add(writer)
        try:
            hello = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
            if hello != HELLO + self.token.encode() + b"\n":
                self.refused += 1
                return
            writer.write(OK)
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size > MAX_FRAME_BYTES:
                    self.refused += 1
                    log.warning("reply door: a %d-byte frame (> %d); connection closed", size, MAX_FRAME_BYTES)
                    return
                value, headers = _FRAME.decode(await reader.readexactly(size))
                self.frames += 1
                try:
                    await self.deliver(value, headers)
                except Exception:  # a bug in delivering one result must not close the door for the next ones
                    log.exception("reply door: delivering a result failed")
        except msgspec.DecodeError as exc:
            self.refused += 1
            log.warning("reply door: a broken frame (%s); connection closed", exc)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the worker went away or never said hello: nothing was lost, the reply topic has it all
        finally:
            self._peers.discard(writer)
            writer.close()


class DoorBell:
    """The worker's side: `ring` queues a published record for the door its request named, never waits and never
    fails. One connection per door, opened on first use; a door that fails is skipped for RETRY_AFTER_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lines: dict[Door, _Line] = {}
        self._shut: dict[Door, float] = {}  # door -> when it may be tried again
        self.rung = 0  # frames queued for a door
        self.skipped = 0  # frames not queued: door shut after a failure, or its queue full

    def ring(self, door: Door | None, value: bytes, headers: Sequence[tuple[str, bytes]] | None) -> None:
        if door is None:
            return
        if self._shut.get(door, 0.0) > self._clock():
            self.skipped += 1
            return
        line = self._lines.get(door)
        if line is None:
            line = self._lines[door] = _Line(door, self._failed)
        frame = _encode((value, list(headers or ())))
        if len(frame) > MAX_FRAME_BYTES or not line.put(len(frame).to_bytes(4, "big") + frame):
            self.skipped += 1
            return
        self.rung += 1

    def _failed(self, door: Door, why: str) -> None:
        now = self._clock()
        self._shut = {d: until for d, until in self._shut.items() if until > now}
        self._shut[door] = now + RETRY_AFTER_S
        self._lines.pop(door, None)
        log.info("reply door %s:%d not used for %.0f s: %s", door.host, door.port, RETRY_AFTER_S, why)

    async def close(self) -> None:
        lines, self._lines = list(self._lines.values()), {}
        for line in lines:
            await line.close()


class _Line:
    """One connection to one door, fed by a queue that its own task drains."""

    def __init__(self, door: Door, failed: Callable[[Door, str], None]):
        self.door = door
        self._failed = failed
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUED_FRAMES)
        self._task = asyncio.create_task(self._run(), name=f"reply-door-{door.host}:{door.port}")

    def put(self, frame: bytes) -> bool:
        try:
            self._queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    async def _run(self) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(self.door.host, self.door.port)
                writer.write(HELLO + self.door.token.encode() + b"\n")
                if await reader.readline() != OK:
                    raise ConnectionError("it did not answer the token")
            while True:
                writer.write(await self._queue.get())
                await writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, reset: the reply topic carries the results
            self._failed(self.door, repr(exc))
        finally:
            if writer is not None:
                writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
