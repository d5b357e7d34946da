"""Per-model ordering: release a model's events strictly in seq_id order, whatever order they arrive in.

Out-of-order events wait in a reorder buffer. If the next seq_id has not arrived `gap_timeout_s` after a later
one did, `expire()` skips the missing ids and reports them as one `range`, so the engine can void them loudly; its
cost does not depend on the size of the gap (a client may skip 2**62 seq_ids). (Voids announced
by a `seq_void` event are ordinary items here: they take their place in the order like any event.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Sequencer(Generic[T]):
    def __init__(self, gap_timeout_s: float, first_seq: int = 0, clock: Callable[[], float] = time.monotonic):
        self.gap_timeout_s = gap_timeout_s
        self.next_seq = first_seq
        self._clock = clock
        self._buffer: dict[int, T] = {}
        self._waiting_since: float | None = None  # when the current gap was first seen

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def offer(self, seq_id: int, item: T) -> list[T] | None:
        """Accept `item`; return every item now releasable, in order, or None if seq_id was already taken."""
        if seq_id < self.next_seq or seq_id in self._buffer:
            return None
        self._buffer[seq_id] = item
        return self._release()

    def expire(self, *, now: bool = False) -> tuple[range, list[T]]:
        """After the gap timeout (`now`: at once): skip the missing seq_ids before the first buffered one (an
        empty range: nothing expired), release what follows."""
        if not self._buffer or self._waiting_since is None:
            return range(0), []
        if not now and self._clock() - self._waiting_since < self.gap_timeout_s:
            return range(0), []
        first = min(self._buffer)
        missing = range(self.next_seq, first)
        self.next_seq = first
        return missing, self._release()

    def _release(self) -> list[T]:
        released: list[T] = []
        start = self.next_seq
        while self.next_seq in self._buffer:
            released.append(self._buffer.pop(self.next_seq))
            self.next_seq += 1
        if not self._buffer:
            self._waiting_since = None
        elif self.next_seq != start or self._waiting_since is None:
            self._waiting_since = self._clock()  # a new gap starts now
        return released
