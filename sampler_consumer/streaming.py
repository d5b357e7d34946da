"""Streamed sampling (`Sample.stream`): while the engine samples a streamed request, what its rows have generated
so far goes out as `sample_delta` events on the reply topic; the `result` then answers as for any request.

The engine's hot path is untouched: every `stream_interval_s`, one call on the engine thread (between two steps)
copies the running rows of the watched requests, and the tokens new since the last delta are published. Deltas
are best effort (the gateway completes a stream from the result), so a failed publish is only logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from bus_events import Envelope, make_sample_delta
from bus_events import payloads as p
from bus_runtime.kafka_io import publish
from bus_runtime.settings import BusSettings
from sampler_consumer.engine_core import EngineCore
from sampler_consumer.requests import GenRequest

log = logging.getLogger(__name__)

# sample index -> (tokens, logprobs) generated so far
Progress = dict[int, tuple[list[int], list[float]]]


@dataclass(eq=False)
class Watched:
    """A streamed request: its envelope, the engine requests it was split into, and what went out already."""

    env: Envelope
    pieces: list[GenRequest]
    sent: dict[int, int] = field(default_factory=dict)  # sample index -> tokens published

    def next_delta(self, progress: Progress) -> p.SampleDelta | None:
        deltas = []
        for index, (tokens, logprobs) in sorted(progress.items()):
            start = self.sent.get(index, 0)
            if len(tokens) > start:
                deltas.append(p.SequenceDelta(index=index, start=start, tokens=tokens[start:],
                                              logprobs=logprobs[start:]))
                self.sent[index] = len(tokens)
        return p.SampleDelta(sequences=deltas) if deltas else None


def read_progress(core: EngineCore, watched: list[Watched]) -> list[Progress]:
    """On the engine thread: copies of the running rows' tokens of each watched request (a piece still waiting
    for rows, or finished, has none)."""
    groups = {id(row.group.request): row.group for engine in core.engines.values()
              for row in engine.scheduler.rows.values()}
    found: list[Progress] = []
    for item in watched:
        progress: Progress = {}
        for piece in item.pieces:
            group = groups.get(id(piece))
            for i, row in enumerate(group.rows if group is not None else ()):
                progress[piece.first_sample + i] = (row.sequence.tokens[:], row.sequence.logprobs[:])
        found.append(progress)
    return found


class DeltaPublisher:
    def __init__(self, core: EngineCore, producer: AIOKafkaProducer, settings: BusSettings,
                 interval_s: float) -> None:
        self.core, self.producer, self.settings, self.interval_s = core, producer, settings, interval_s
        self._watched: dict[str, Watched] = {}
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task] = set()  # publishes in flight: the next poll does not wait for acks

    def watch(self, env: Envelope, pieces: list[GenRequest]) -> None:
        """Stream `env`'s request from now on (call before handing its pieces to the engine)."""
        self._watched[env.request_id] = Watched(env, pieces)
        self._wake.set()

    def forget(self, request_id: str) -> None:
        """Its result is on its way: no delta after it."""
        self._watched.pop(request_id, None)

    async def run(self) -> None:
        while True:
            if not self._watched:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.interval_s)
            watched = list(self._watched.values())
            if not watched:
                continue
            progress = await asyncio.wrap_future(self.core.call(functools.partial(read_progress, watched=watched)))
            for item, found in zip(watched, progress, strict=True):
                if item.env.request_id not in self._watched:
                    continue  # answered while we read
                delta = item.next_delta(found)
                if delta is not None:
                    # Tasks start in creation order, so each request's deltas reach the producer in order.
                    task = asyncio.create_task(self._publish(item.env, delta))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)

    async def _publish(self, request: Envelope, delta: p.SampleDelta) -> None:
        event = make_sample_delta(request, delta)
        try:
            await publish(self.producer, self.settings.topics.replies, event.env, event.payload,
                          claim_check_bytes=self.settings.claim_check_bytes,
                          signing_key=self.settings.reply_signing_key)  # a reply: the gateway drops unsigned ones
        except Exception as exc:  # the result still answers the request in full
            log.warning("sample_delta for %s not published: %s", request.request_id, exc)
