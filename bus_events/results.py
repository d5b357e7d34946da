"""Replies: the `result` event that answers a request, and the one table of what each request type answers with."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from bus_events import payloads as p
from bus_events.envelope import ContractError, Envelope, Event, EventType, make_event

# What `Result.result` holds for each request type once it succeeded (docs/events.md, "results").
RESULT_TYPES: dict[EventType, type[msgspec.Struct]] = {
    EventType.CREATE_MODEL: p.ModelInfo,
    EventType.GET_INFO: p.ModelInfo,
    EventType.LOAD_WEIGHTS: p.PathResult,
    EventType.FORWARD_BACKWARD: p.ForwardBackwardResult,
    EventType.OPTIM_STEP: p.OptimStepResult,
    EventType.SAVE_WEIGHTS: p.PathResult,
    EventType.SAVE_WEIGHTS_FOR_SAMPLER: p.PathResult,
    EventType.SAVE_WEIGHTS_EXTERNAL: p.PathResult,
    EventType.UNLOAD_MODEL: p.PathResult,
    EventType.EXPORT_MODEL: p.ExportResult,
    EventType.SAMPLE: p.SampleResult,
}

_RESULT_TYPE_BY_NAME = {str(t): cls for t, cls in RESULT_TYPES.items()}

UNKNOWN_REQUEST_TYPE = "unknown"


class Reply(NamedTuple):
    """A `result` event: its envelope and its Result payload (what workers publish on the reply topic)."""

    env: Envelope
    payload: p.Result


def _reply(result: p.Result, **envelope: Any) -> Reply:
    env, _ = make_event(EventType.RESULT, result, **envelope)
    return Reply(env, result)


def decode_result(request_type: EventType | str, body: dict[str, Any] | None) -> Any:
    """The typed result of a successful `request_type` request; ContractError if the body does not fit."""
    cls = _RESULT_TYPE_BY_NAME.get(str(request_type))  # an EventType is a StrEnum: str() is its value
    if cls is None:
        raise ContractError(f"request type {request_type!r} has no result schema")
    try:
        return msgspec.convert(body or {}, cls)
    except msgspec.ValidationError as exc:
        raise ContractError(f"malformed {cls.__name__} for a {request_type} result: {exc}") from exc


def make_result(
    request: Envelope,
    result: msgspec.Struct | dict[str, Any] | None = None,
    error: p.ErrorInfo | None = None,
    *,
    started_at: float | None = None,
) -> Reply:
    """The reply to `request`: a `result` event with the same request_id, model_id and seq_id. `started_at`: when
    the worker began computing it (None: it was answered without computing)."""
    body = msgspec.to_builtins(result, builtin_types=(bytes,)) if isinstance(result, msgspec.Struct) else result
    return _reply(
        p.Result(request_type=request.type.value, result=body if error is None else None, error=error,
                 started_at=started_at),
        model_id=request.model_id,
        request_id=request.request_id,
        seq_id=request.seq_id,
        tenant=request.tenant,
        trace_id=request.trace_id,
    )


def make_sample_delta(request: Envelope, delta: p.SampleDelta) -> Event:
    """A `sample_delta` event for a streamed `sample` request: the ids of its eventual result."""
    return make_event(EventType.SAMPLE_DELTA, delta, model_id=request.model_id, request_id=request.request_id,
                      seq_id=request.seq_id, tenant=request.tenant, trace_id=request.trace_id)


def make_error_result(
    request_id: str,
    model_id: str,
    tenant: str,
    message: str,
    *,
    category: p.ErrorCategory = "user",
    request_type: str = UNKNOWN_REQUEST_TYPE,
    seq_id: int | None = None,
) -> Reply:
    """A failed `result` for a request known only by its ids (e.g. one whose own event could not be decoded)."""
    return _reply(
        p.Result(request_type=request_type, error=p.ErrorInfo(message=message or "request failed",
                                                              category=category)),
        model_id=model_id,
        request_id=request_id,
        seq_id=seq_id,
        tenant=tenant,
    )


def outcome(result: p.Result) -> dict[str, Any]:
    """`result` as builtins without `started_at`: what two computations of one request agree on (a trainer that
    re-applies an event after a restart, a replay)."""
    return msgspec.to_builtins(msgspec.structs.replace(result, started_at=None), builtin_types=(bytes,))
