"""From a training-topic record to an engine Inbound (bus_runtime.records does the decoding every consumer shares).

Shared by the live worker and `replay`, so a replayed log goes through exactly what the trainer saw. A record
that breaks the contract is `Poisoned`; if it still names its model and seq_id, that seq_id is burnt and `void`
is the seq_void that takes its place in the model's order (so the model does not wait for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bus_events import TRAINING_EVENTS, BlobStore, ContractError, Envelope, EventType, make_event
from bus_events import payloads as p
from bus_runtime.records import Poisoned as PoisonedRecord
from bus_runtime.records import Stage, UnverifiedEvent, decode_record
from trainer_consumer.inbound import BusPosition, Inbound


@dataclass(frozen=True)
class Poisoned:
    error: ContractError
    stage: Stage  # the dead-letter stage
    void: Inbound | None  # the seq_void standing in for it, when its model and seq_id are known


def _check_seq_id(env: Envelope) -> None:
    if env.seq_id is not None and env.seq_id < 0:
        raise ContractError(f"seq_id must be >= 0, got {env.seq_id}", env.request_id, env.model_id)


async def decode_training_record(raw: bytes, position: BusPosition, blobs: BlobStore | None,
                                 verify: Callable[[Envelope], None] | None = None) -> Inbound | Poisoned:
    """`verify`: the tenant check of the record (records.SignatureCheck), before anything else is read."""
    def check(env: Envelope) -> None:
        if verify is not None:
            verify(env)
        _check_seq_id(env)

    decoded = await decode_record(raw, blobs, TRAINING_EVENTS, check=check)
    if isinstance(decoded, PoisonedRecord):
        # An event not proven to be its tenant's must not touch that tenant's model, not even void a seq_id.
        void = None if isinstance(decoded.error, UnverifiedEvent) else _void_for(decoded.env, decoded.error, position)
        return Poisoned(decoded.error, decoded.stage, void)
    assert decoded.payload is not None  # no type is envelope-only here
    return Inbound(decoded.env, decoded.payload, position)


def _void_for(env: Envelope | None, exc: ContractError, position: BusPosition) -> Inbound | None:
    if env is None or env.seq_id is None or env.type == EventType.SEQ_VOID:
        return None
    void_env, body = make_event(EventType.SEQ_VOID, p.SeqVoid(reason=f"dead-lettered: {exc}"),
                                model_id=env.model_id, request_id=env.request_id, seq_id=env.seq_id,
                                tenant=env.tenant)
    return Inbound(void_env, body, position, voided_type=env.type.value)
