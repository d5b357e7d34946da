"""What a model's scheduler (stream.py) decides for an event, for the engine to carry out.

`Apply` and `Void` are *ready* actions: they take their seq_id's place in the model's order and the engine applies
them one after the other on the model's lane. The others answer an event at once, outside the order.

Batching seam: the engine applies one ready action per model at a time, but ready actions of different models are
independent. A batched backend (several adapters in one forward/backward, `backends.base.forward_backward_many`)
gets its batch by taking the `Apply`s at the heads of several models' lanes whose events are forward_backwards;
nothing here or in the stream has to change for that.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus_events import Reply
from bus_runtime.errors import Category
from trainer_consumer.inbound import Inbound


@dataclass(frozen=True)
class Apply:
    """Run the event's op (its turn in the model's order has come)."""

    inbound: Inbound


@dataclass(frozen=True)
class Void:
    """The seq_id takes its place without an op: poison the gradient window, answer late copies as stale. A gap's
    void stands for the whole `span` of missing seq_ids (its inbound carries the span's last one)."""

    inbound: Inbound
    reason: str
    category: Category
    span: range | None = None


@dataclass(frozen=True)
class AnswerDuplicate:
    """An event whose seq_id was applied before: answer with the first reply, apply nothing."""

    inbound: Inbound
    replies: list[Reply]


@dataclass(frozen=True)
class AnswerStale:
    """An event whose seq_id is gone (voided, or applied too long ago to be in the result cache): an error reply."""

    inbound: Inbound
    message: str


@dataclass(frozen=True)
class Finish:
    """Done without a reply (an ignored seq_void; `owed=False`: a re-read event the restored snapshot covers)."""

    inbound: Inbound
    owed: bool = True


@dataclass(frozen=True)
class Hold:
    """Waits until the model's snapshot is read; the stream accepts it again then, in arrival order."""

    inbound: Inbound


Ready = Apply | Void
Action = Apply | Void | AnswerDuplicate | AnswerStale | Finish | Hold
