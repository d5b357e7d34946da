"""The tinker-bus event contract: one envelope, one payload schema per event type, msgpack on the wire.

Producers and consumers (gateway, trainer, sampler, external publishers) all go through this package.
The human-readable form of the same contract is docs/events.md.
"""

from bus_events import payloads
from bus_events.envelope import (
    DEFAULT_CLAIM_CHECK_BYTES,
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    TRAINING_EVENTS,
    BlobStore,
    ContractError,
    Envelope,
    EventType,
    PayloadRef,
    decode_envelope,
    decode_payload,
    encode_event,
    make_event,
    make_result,
    new_id,
    payload_bytes,
)
from bus_events.tensors import Tensor, tensor_from_numpy
from bus_events.topics import Topics

__all__ = [
    "DEFAULT_CLAIM_CHECK_BYTES",
    "PAYLOAD_TYPES",
    "SCHEMA_VERSION",
    "TRAINING_EVENTS",
    "BlobStore",
    "ContractError",
    "Envelope",
    "EventType",
    "PayloadRef",
    "Tensor",
    "Topics",
    "decode_envelope",
    "decode_payload",
    "encode_event",
    "make_event",
    "make_result",
    "new_id",
    "payload_bytes",
    "payloads",
    "tensor_from_numpy",
]
