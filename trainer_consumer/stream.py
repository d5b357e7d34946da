"""One model's event stream inside the engine: ordering, the dedupe cache, the queue of events to apply, and its
recovery bookkeeping (restore, durability, the tasks working on it)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from bus_events import Envelope
from bus_events import payloads as p
from trainer_consumer.durability import Durability, DurablePoint
from trainer_consumer.errors import Category
from trainer_consumer.model_state import BusPosition, ModelState
from trainer_consumer.sequencer import Sequencer

Reply = tuple[Envelope, p.Result]


@dataclass(eq=False)
class Inbound:
    """A decoded training event and where it came from. `scheduled` is set once it waits for compute."""

    env: Envelope
    payload: Any
    position: BusPosition | None = None
    scheduled: bool = False
    # For seq_void items: the type of the request whose seq_id is void, when known (None: could be anything).
    voided_type: str | None = None


@dataclass(eq=False)
class ModelStream:
    model_id: str
    sequencer: Sequencer[Inbound]
    max_results: int
    state: ModelState | None = None
    ready: deque[Inbound] = field(default_factory=deque)
    running: bool = False
    # seq_ids accepted but not yet answered (buffered, queued or running), with duplicates waiting on them.
    pending: dict[int, list[Inbound]] = field(default_factory=dict)
    results: OrderedDict[int, Reply] = field(default_factory=OrderedDict)
    void_reasons: OrderedDict[int, tuple[str, Category]] = field(default_factory=OrderedDict)
    # Recovery. The (topic, partition) its events come from (all of a model's events share its key's partition).
    partition: tuple[str, int] | None = None
    # While its snapshot is being read, arriving events wait here in arrival order.
    restoring: bool = False
    held: list[Inbound] = field(default_factory=list)
    # Set when restored: re-read events it covers were applied and answered before, and are skipped silently.
    covered: DurablePoint | None = None
    # Why the model cannot be served here (its snapshot names a base model this trainer lacks...), if so.
    unavailable: str | None = None
    durability: Durability = field(default_factory=Durability)
    stopping: bool = False  # its partition is being handed over: apply nothing more
    task: asyncio.Task | None = None  # the drain (or restore) working on it
    writer: asyncio.Task | None = None  # its snapshot / progress-marker upload

    def note_position(self, position: BusPosition | None) -> None:
        if position is not None and self.partition is None:
            self.partition = (position.topic, position.partition)

    def remember(self, seq_id: int, reply: Reply) -> list[Inbound]:
        """Cache the first reply of seq_id; return the duplicates that waited for it."""
        self.results[seq_id] = reply
        while len(self.results) > self.max_results:
            self.results.popitem(last=False)
        return self.pending.pop(seq_id, [])

    def remember_void(self, seq_id: int, reason: str, category: Category) -> None:
        self.void_reasons[seq_id] = (reason, category)
        while len(self.void_reasons) > self.max_results:
            self.void_reasons.popitem(last=False)

    def enqueue(self, items: list[Inbound]) -> None:
        for item in items:
            item.scheduled = True
            self.ready.append(item)
