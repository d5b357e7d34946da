"""From a consumed record to the fold (series.py): decode it the way every consumer does (bus_runtime.records)
and hand the envelope and what the curves need to MetricsState. Poison is counted and skipped: the trainer and
sampler dead-letter it; a view has nothing to answer."""

from __future__ import annotations

from bus_events import TRAINING_EVENTS, BlobStore, ContractError, EventType, decode_result
from bus_events import payloads as p
from bus_runtime.records import Poisoned, decode_record
from metrics_stream.series import MetricsState

REQUEST_TYPES = TRAINING_EVENTS | {EventType.SAMPLE}
# Only these requests' payloads carry what the curves use (tokens, learning rate); the others are read as
# envelopes, so no claim check is fetched for them.
PAYLOAD_NEEDED = {EventType.FORWARD_BACKWARD, EventType.OPTIM_STEP}


async def ingest_request(state: MetricsState, raw: bytes | None, blobs: BlobStore | None) -> bool:
    decoded = await decode_record(raw, blobs, REQUEST_TYPES, envelope_only=REQUEST_TYPES - PAYLOAD_NEEDED)
    if isinstance(decoded, Poisoned):
        return False
    state.request(decoded.env, decoded.payload)
    return True


async def ingest_reply(state: MetricsState, raw: bytes | None, blobs: BlobStore | None) -> bool:
    decoded = await decode_record(raw, blobs, {EventType.RESULT, EventType.SAMPLE_DELTA},
                                  envelope_only={EventType.SAMPLE_DELTA})
    if not isinstance(decoded, Poisoned) and decoded.env.type == EventType.SAMPLE_DELTA:
        return True  # streaming progress: the result that follows is what counts
    if isinstance(decoded, Poisoned) or not isinstance(decoded.payload, p.Result):
        return False
    result = decoded.payload
    typed = None
    if result.error is None:
        try:
            typed = decode_result(result.request_type, result.result)
        except ContractError:  # a request type without a result schema (e.g. "unknown"): counted, not plotted
            typed = None
    state.reply(decoded.env, result, typed)
    return True
