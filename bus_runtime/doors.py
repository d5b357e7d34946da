"""Doors: a part hands a record it has just had acknowledged by the broker straight to the part that reads it
next, so that reader need not wait for its next fetch (issue 14). Tansu never wakes a fetch early
(fetch_pacing.py), and a client calling one step at a time pays a fetch wait on each of a call's two hops:

- the reply door: a trainer hands its result to the gateway that asked (that gateway's door is named in the
  request's header `tb-reply-door`);
- the intake door: a gateway hands a training request to the trainer that owns its partition (the trainer's door
  and partitions are in its heartbeat document in S3, which the gateway reads).

A door does not replace the log:
- a record is handed only after the broker acknowledged it, so what anyone acts on is in the log, and the reader
  checks a handed record exactly as one it fetched (signatures included). A big record's bytes may go ahead
  (`DoorBell.announce`, an `Early` frame sent as the produce starts), so they cross while the broker writes; the
  door delivers it only when its `Acked` frame says where the broker put it (`Dropped`: the produce failed);
- the copy fetched later changes nothing: a result's future is already resolved (the first result counts), and a
  trainer drops the fetched copy of a request it took from its door after checking it is byte for byte the one it
  was handed (trainer_consumer/handed.py);
- everything is best effort: a door that cannot be reached, answers another token, or lags is skipped for a
  while, and its records arrive through the topics as they always did.

A door's token (random per process) keeps a part from talking to anything else on that port: whatever listens
there never answers `ok` to the token. Wire (TCP): the ringing side sends `tinker-bus-door/2 <token>\\n`, the door
answers `ok\\n` if the token is its own (else it closes), then frames: a 4-byte big-endian length, then a msgpack
array whose first item names the frame: ["r", value, headers, topic, partition, offset, key] (a record as
acknowledged), ["e", ticket, value, headers, topic, partition, key] (a record being produced), ["a", ticket,
partition, offset] (that record acknowledged there) or ["d", ticket] (it was not). Tickets count per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import msgspec

log = logging.getLogger(__name__)

REPLY_DOOR_HEADER = "tb-reply-door"
HELLO = b"tinker-bus-door/2 "  # /2: tagged frames, early records
OK = b"ok\n"
MAX_FRAME_BYTES = 64 << 20  # records are smaller: bigger payloads travel in the claim-check store
HANDSHAKE_TIMEOUT_S = 1.0
RETRY_AFTER_S = 30.0  # how long a door that failed is left alone
QUEUED_FRAMES = 1024  # per door; beyond this a lagging door misses records (the topics still have them)
UNACKED = -1  # the offset of a record the broker has not acknowledged yet
EARLY_KEPT = 64  # per connection: early records waiting for their Acked frame (the oldest go first)
_TOKEN = re.compile(r"[0-9a-f]{32}")


class BusRecord(msgspec.Struct, array_like=True, frozen=True, tag="r"):
    """A record as the broker acknowledged it (kafka_io.publish returns one): what a door hands on."""

    value: bytes
    headers: list[tuple[str, bytes]]
    topic: str
    partition: int
    offset: int
    key: bytes | None = None


class Early(msgspec.Struct, array_like=True, frozen=True, tag="e"):
    """A record whose produce has started, without its offset yet: held by the door until its Acked frame."""

    ticket: int
    value: bytes
    headers: list[tuple[str, bytes]]
    topic: str
    partition: int
    key: bytes | None = None

    def at(self, offset: int) -> BusRecord:
        return BusRecord(self.value, self.headers, self.topic, self.partition, offset, self.key)


class Acked(msgspec.Struct, array_like=True, frozen=True, tag="a"):
    ticket: int
    partition: int
    offset: int


class Dropped(msgspec.Struct, array_like=True, frozen=True, tag="d"):
    ticket: int


Frame = BusRecord | Early | Acked | Dropped
Deliver = Callable[[BusRecord], Awaitable[None]]
_FRAME = msgspec.msgpack.Decoder(Frame)
_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True)
class Door:
    host: str
    port: int
    token: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def spec(self) -> str:
        """`host:port/token`: how a header or a heartbeat names the door (`parse` reads it back)."""
        return f"{self.address}/{self.token}"

    def header(self) -> tuple[str, bytes]:
        return REPLY_DOOR_HEADER, self.spec.encode()

    @property
    def hello(self) -> bytes:
        """What the ringing side says first, and the only thing the door answers `ok` to."""
        return HELLO + self.token.encode() + b"\n"

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Door | None:
        """The door a spec names; None for anything else (a forged one costs at most one failed handshake)."""
        try:
            text = raw.decode("ascii") if isinstance(raw, bytes) else (raw or "")
            address, token = text.rsplit("/", 1)
            host, port = address.rsplit(":", 1)
            door = cls(host.strip("[]"), int(port), token)
        except (ValueError, UnicodeDecodeError):
            return None
        return door if door.host and 0 < door.port < 65536 and _TOKEN.fullmatch(token) else None


def reply_door_of(headers: Iterable[tuple[str, bytes]] | None) -> Door | None:
    """The reply door a request's headers name, if any."""
    return next((Door.parse(value) for key, value in headers or () if key == REPLY_DOOR_HEADER), None)


class DoorServer:
    """The reading side: accepts the records handed over and passes each to `deliver`, in the order each
    connection sent them. `preview` is shown an announced record (offset UNACKED) as its bytes arrive, so the
    reader can start on it while the broker writes; only `deliver` says it may be acted on."""

    def __init__(self, host: str, deliver: Deliver, preview: Callable[[BusRecord], None] | None = None):
        self.host = host
        self.deliver = deliver
        self.preview = preview
        self.token = secrets.token_hex(16)
        self.door: Door | None = None  # once started
        self.frames = 0  # records handed over
        self.refused = 0  # connections closed for a wrong token, an oversized or broken frame
        self._server: asyncio.Server | None = None
        self._peers: set[asyncio.StreamWriter] = set()
        self._serving: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.door = Door(self.host, port, self.token)
        log.info("door open on %s:%d", self.host, port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._peers):  # since 3.12 wait_closed also waits for the open connections
            writer.close()
        await self._server.wait_closed()
        if self._serving:  # let them end on the closed sockets: Python 3.11 logs a traceback for each one cancelled
            await asyncio.wait(set(self._serving), timeout=HANDSHAKE_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs each connection's callback in a task of its own
        self._serving.add(task)
        self._peers.add(writer)
        try:
            hello = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
            if self.door is None or hello != self.door.hello:
                self.refused += 1
                return
            writer.write(OK)
            early: dict[int, Early] = {}
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                if size > MAX_FRAME_BYTES:
                    self.refused += 1
                    log.warning("door: a %d-byte frame (> %d); connection closed", size, MAX_FRAME_BYTES)
                    return
                frame = _FRAME.decode(await reader.readexactly(size))
                if isinstance(frame, Early) and self.preview is not None:
                    self.preview(frame.at(UNACKED))
                record = settled_record(frame, early)
                if record is None:
                    continue
                self.frames += 1
                try:
                    await self.deliver(record)
                except Exception:  # a bug in taking one record must not close the door for the next ones
                    log.exception("door: taking a handed record failed")
        except msgspec.DecodeError as exc:
            self.refused += 1
            log.warning("door: a broken frame (%s); connection closed", exc)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the other side went away or never said hello: nothing was lost, the topics have it all
        finally:
            self._peers.discard(writer)
            self._serving.discard(task)
            writer.close()


def settled_record(frame: Frame, early: dict[int, Early]) -> BusRecord | None:
    """The acknowledged record a frame completes, if any; an Early frame is kept in `early` until its answer."""
    if isinstance(frame, BusRecord):
        return frame
    if isinstance(frame, Early):
        early[frame.ticket] = frame
        if len(early) > EARLY_KEPT:  # its Acked frame was lost with a full queue: the topics have the record
            del early[next(iter(early))]
        return None
    held = early.pop(frame.ticket, None)
    if held is None or isinstance(frame, Dropped):
        return None
    return held.at(frame.offset) if held.partition == frame.partition else None


@dataclass(frozen=True)
class Ticket:
    """An announced record: its Acked or Dropped frame must follow on the same connection."""

    line: _Line
    number: int


class DoorBell:
    """The handing side: `ring` queues an acknowledged record for a door, never waits and never fails. One
    connection per door, opened on first use; a door that fails is skipped for RETRY_AFTER_S. `announce` sends a
    record's bytes as its produce starts and `settle` then says where the broker put it (or that it did not)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lines: dict[Door, _Line] = {}
        self._shut: dict[Door, float] = {}  # door -> when it may be tried again
        self._tickets = itertools.count(1)
        self.rung = 0  # records queued for a door (an announced one counts when settled)
        self.announced = 0  # records whose bytes went ahead of their acknowledgement
        self.skipped = 0  # records not queued: door shut after a failure, or its queue full

    def ring(self, door: Door | None, record: BusRecord) -> None:
        line = self._line(door)
        if line is not None and self._put(line, record):
            self.rung += 1

    def announce(self, door: Door | None, record: BusRecord) -> Ticket | None:
        """Queue `record`'s bytes (its offset is not known yet) for `door`; None when they could not be."""
        line = self._line(door)
        if line is None:
            return None
        ticket = Ticket(line, next(self._tickets))
        early = Early(ticket.number, record.value, record.headers, record.topic, record.partition, record.key)
        if not self._put(line, early):
            return None
        self.announced += 1
        return ticket

    def settle(self, ticket: Ticket, record: BusRecord | None) -> None:
        """The announced record was acknowledged as `record` (None: its produce failed)."""
        if self._lines.get(ticket.line.door) is not ticket.line:  # that connection failed: the door forgot it
            if record is not None:
                self.skipped += 1
            return
        if record is None:
            self._put(ticket.line, Dropped(ticket.number))
        elif self._put(ticket.line, Acked(ticket.number, record.partition, record.offset)):
            self.rung += 1

    def _line(self, door: Door | None) -> _Line | None:
        if door is None:
            return None
        if self._shut.get(door, 0.0) > self._clock():
            self.skipped += 1
            return None
        line = self._lines.get(door)
        if line is None:
            line = self._lines[door] = _Line(door, self._failed)
        return line

    def _put(self, line: _Line, frame: Frame) -> bool:
        encoded = _encode(frame)
        if len(encoded) > MAX_FRAME_BYTES or not line.put(len(encoded).to_bytes(4, "big") + encoded):
            self.skipped += 1
            return False
        return True

    def _failed(self, door: Door, why: str) -> None:
        now = self._clock()
        self._shut = {d: until for d, until in self._shut.items() if until > now}
        self._shut[door] = now + RETRY_AFTER_S
        self._lines.pop(door, None)
        log.info("door %s not used for %.0f s: %s", door.address, RETRY_AFTER_S, why)

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
        self._task = asyncio.create_task(self._run(), name=f"door-{door.address}")

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
                writer.write(self.door.hello)
                if await reader.readline() != OK:
                    raise ConnectionError("it did not answer the token")
            while True:
                writer.write(await self._queue.get())
                await writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, reset: the topics carry the records
            self._failed(self.door, repr(exc))
        finally:
            if writer is not None:
                writer.close()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
