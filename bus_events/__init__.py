"""The tinker-bus event contract: one envelope, one payload schema per event type, msgpack on the wire.

Producers and consumers (gateway, trainer, sampler, external publishers) all go through this package.
The human-readable form of the same contract is docs/events.md.
"""

from bus_events import ids, payloads
from bus_events.envelope import (
    DEFAULT_CLAIM_CHECK_BYTES,
    DEFAULT_TENANT,
    EVENT_TYPES,
    MAX_SEQ_AHEAD,
    PAYLOAD_TYPES,
    SCHEMA_VERSION,
    TRAINING_EVENTS,
    UNANSWERED_EVENTS,
    BlobStore,
    ContractError,
    Envelope,
    Event,
    EventType,
    PayloadRef,
    decode_envelope,
    decode_payload,
    encode_event,
    event_type_of,
    make_event,
    new_id,
    payload_bytes,
)
from bus_events.results import (
    RESULT_TYPES,
    Reply,
    decode_result,
    make_error_result,
    make_result,
    make_sample_delta,
)
from bus_events.tensors import Tensor, tensor_from_numpy, token_ids_tensor
from bus_events.topics import Topics

__all__ = [
    "DEFAULT_CLAIM_CHECK_BYTES",
    "DEFAULT_TENANT",
    "EVENT_TYPES",
    "MAX_SEQ_AHEAD",
    "PAYLOAD_TYPES",
    "RESULT_TYPES",
    "SCHEMA_VERSION",
    "TRAINING_EVENTS",
    "UNANSWERED_EVENTS",
    "BlobStore",
    "ContractError",
    "Envelope",
    "Event",
    "EventType",
    "PayloadRef",
    "Reply",
    "Tensor",
    "Topics",
    "decode_envelope",
    "decode_payload",
    "decode_result",
    "encode_event",
    "event_type_of",
    "ids",
    "make_error_result",
    "make_event",
    "make_result",
    "make_sample_delta",
    "new_id",
    "payload_bytes",
    "payloads",
    "tensor_from_numpy",
    "token_ids_tensor",
]
