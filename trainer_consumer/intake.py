"""From a training-topic record to an engine Inbound: decode, validate, fetch a claim-checked payload.

Shared by the live worker and `replay`, so a replayed log goes through exactly what the trainer saw. A record
that breaks the contract is `Poisoned`; if it still names its model and seq_id, that seq_id is burnt and `void`
is the seq_void that takes its place in the model's order (so the model does not wait for it).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bus_events import (
    TRAINING_EVENTS,
    BlobStore,
    ContractError,
    Envelope,
    EventType,
    decode_envelope,
    decode_payload,
    make_event,
)
from bus_events import payloads as p
from trainer_consumer.model_state import BusPosition
from trainer_consumer.stream import Inbound


@dataclass(frozen=True)
class Poisoned:
    error: ContractError
    stage: str  # the dead-letter stage: "decode" or "validate"
    void: Inbound | None  # the seq_void standing in for it, when its model and seq_id are known


async def decode_training_record(raw: bytes, position: BusPosition, blobs: BlobStore | None) -> Inbound | Poisoned:
    try:
        env = decode_envelope(raw)
    except ContractError as exc:
        return Poisoned(exc, "decode", None)
    try:
        if env.type not in TRAINING_EVENTS:
            raise ContractError(f"{env.type.value} events do not belong on the training topic {position.topic}",
                                env.request_id, env.model_id)
        if env.seq_id is not None and env.seq_id < 0:
            raise ContractError(f"seq_id must be >= 0, got {env.seq_id}", env.request_id, env.model_id)
        if env.payload_ref is not None:  # an S3 read: off the event loop
            payload = await asyncio.to_thread(decode_payload, env, blobs)
        else:
            payload = decode_payload(env)
    except ContractError as exc:
        return Poisoned(exc, "validate", _void_for(env, exc, position))
    except Exception as exc:  # the claim check could not be fetched: this event cannot be applied
        error = ContractError(f"payload unreadable: {exc}", env.request_id, env.model_id)
        return Poisoned(error, "decode", _void_for(env, error, position))
    return Inbound(env, payload, position)


def _void_for(env: Envelope, exc: ContractError, position: BusPosition) -> Inbound | None:
    if env.seq_id is None or env.type == EventType.SEQ_VOID:
        return None
    void_env, body = make_event(EventType.SEQ_VOID, p.SeqVoid(reason=f"dead-lettered: {exc}"),
                                model_id=env.model_id, request_id=env.request_id, seq_id=env.seq_id,
                                tenant=env.tenant)
    return Inbound(void_env, body, position, voided_type=env.type.value)
