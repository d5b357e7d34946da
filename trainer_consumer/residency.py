"""Which models stay in the trainer's memory: an idle lifecycle for adapters (issue 20, item 9).

SDK 0.38 never unloads a model, so without this every training client ever created would keep its adapter and
AdamW moments on the GPU. A model is *offloaded* (its stream and adapter dropped, like on a hand-over) when

- it has been idle for `idle_offload_s`, or
- its session missed heartbeats for `session_expiry_s` (the client is gone), or
- more than `max_resident_adapters` models are resident (the least recently used go first),

and only when it is quiet and durable: nothing queued, running, held or waiting for a gap; a clean gradient
window; everything it applied covered by its snapshot or a progress marker (recovery.py writes the missing one
first). Nothing is lost: its next event restores it from the snapshot, the same lazy restore a trainer does after
a crash or a rebalance (docs/recovery.md). What a reload costs is one snapshot read; duplicates of requests older
than the offload are answered as after a restart.

Policy only: the engine calls `touch` on every event, `forget` when a model leaves, and asks `due()` each tick
which models to try; `TrainerEngine.offload` carries an offload out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from trainer_consumer.stream import ModelStream, Phase

SESSION_CHECK_S = 30.0  # how often the sessions of resident models are looked up (one registry read each)


@dataclass
class Residency:
    idle_offload_s: float  # 0: never for idleness alone
    max_resident: int  # 0: no bound
    session_expiry_s: float  # 0: sessions never expire here
    clock: Callable[[], float] = time.monotonic
    last_used: OrderedDict[str, float] = field(default_factory=OrderedDict)  # least recently used first
    # Sessions whose heartbeats stopped (refreshed by the engine from the registry): their models go first.
    expired_sessions: set[str] = field(default_factory=set)
    offloads: int = 0  # models offloaded so far (the worker's heartbeat reports it)

    def touch(self, model_id: str) -> None:
        self.last_used[model_id] = self.clock()
        self.last_used.move_to_end(model_id)

    def forget(self, model_id: str) -> None:
        self.last_used.pop(model_id, None)

    def due(self, session_of: Callable[[str], str]) -> list[str]:
        """Models to offload now, most urgent first (each still has to be quiet and durable)."""
        now = self.clock()
        order = list(self.last_used)  # LRU first
        expired = [m for m in order if session_of(m) in self.expired_sessions]
        idle = [m for m in order if self.idle_offload_s and now - self.last_used[m] >= self.idle_offload_s]
        over = order[:max(0, len(order) - self.max_resident)] if self.max_resident else []
        return list(dict.fromkeys([*expired, *idle, *over]))

    def sessions_to_check(self, session_of: Callable[[str], str]) -> set[str]:
        return {session_of(m) for m in self.last_used} if self.session_expiry_s else set()

    def sessions_seen(self, heartbeats: Iterable[tuple[str, float | None]], wall_now: float) -> None:
        """`(session_id, last heartbeat as time.time(), None: no such session)`: which ones expired."""
        self.expired_sessions = {s for s, beat in heartbeats
                                 if beat is not None and wall_now - beat > self.session_expiry_s}


def quiet(stream: ModelStream, scheduled: int, draining: bool) -> bool:
    """Nothing of the model is queued, running, held, or waiting for a missing seq_id or its first copy."""
    state = stream.state
    return (stream.phase is Phase.ACTIVE and not draining and scheduled == 0 and not stream.pending
            and not stream.held and stream.sequencer.buffered == 0
            and (state is None or state.unloaded or state.window_clean))


def durable(stream: ModelStream) -> bool:
    """S3 holds everything the model applied: dropping it loses nothing and its offsets may be committed."""
    durability = stream.durability
    return durability.writing is None and not durability.dirty and durability.hold is None
