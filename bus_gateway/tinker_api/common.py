"""Helpers shared by the Tinker API and the legacy JSON API: promises, checked submission, payload building."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from artifact_store import InvalidPath, TinkerPath, check_name
from bus_events import EventType
from bus_gateway.errors import FieldError
from bus_gateway.futures import Future
from bus_gateway.state import Gateway
from bus_gateway.tinker_api.schemas import ID_PATTERN, UntypedFuture

S = TypeVar("S", bound=msgspec.Struct)
EPHEMERAL_PREFIX = "ephemeral-"


def promise(fut: Future, sample_sequence_ids: list[str] | None = None) -> UntypedFuture:
    return UntypedFuture(request_id=fut.request_id, model_id=fut.model_id, sample_sequence_ids=sample_sequence_ids)


def build(cls: type[S], field: str, **values: Any) -> S:
    """Construct a bus payload struct; its own checks (__post_init__) become a FieldError on `field`."""
    try:
        return cls(**values)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise FieldError(field, str(exc)) from exc


def first_request(gw: Gateway, key: str, seq_id: int | None, tenant: str) -> Future | None:
    """The future of an earlier POST with the same (model or sampling session, seq_id): retries get it back."""
    first = gw.futures.first_for((key, seq_id)) if seq_id is not None else None
    return first if first is not None and first.tenant == tenant else None


async def submit_training(
    gw: Gateway,
    tenant: str,
    model_id: str,
    seq_id: int | None,
    checked_payload: Callable[[], Awaitable[tuple[EventType, msgspec.Struct]]],
    context: dict[str, Any] | None = None,
    request_type: EventType | None = None,
) -> Future:
    """Dedupe on (model_id, seq_id), validate, publish. A request rejected at validation still consumed its
    seq_id on the client, so the trainer is told (seq_void) not to wait for it."""
    if (first := first_request(gw, model_id, seq_id, tenant)) is not None:
        return first
    try:
        event_type, payload = await checked_payload()
        return await gw.submit(event_type, payload, model_id=model_id, seq_id=seq_id, tenant=tenant,
                               context=context)
    except FieldError as exc:
        if seq_id is not None:
            await gw.void_seq(model_id, seq_id, str(exc), tenant, request_type)
        raise


def checkpoint_name(name: str | None, field: str = "path") -> str:
    if not name:
        raise FieldError(field, "required: the checkpoint name")
    try:
        check_name(name)
    except InvalidPath as exc:
        raise FieldError(field, str(exc)) from exc
    if name.startswith(EPHEMERAL_PREFIX):
        raise FieldError(field, f"names starting with {EPHEMERAL_PREFIX!r} are reserved for ephemeral sampler saves")
    return name


def parse_path(path: str, field: str = "path") -> TinkerPath:
    try:
        parsed = TinkerPath.parse(path)
    except InvalidPath as exc:
        raise FieldError(field, str(exc)) from exc
    if not re.match(ID_PATTERN, parsed.run_id):
        raise FieldError(field, f"{parsed.run_id!r} is not a training run id")
    return parsed


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id_for(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def session_of_model(model_id: str) -> str:
    return model_id.rsplit(":train:", 1)[0]
