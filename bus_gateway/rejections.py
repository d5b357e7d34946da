"""Training requests refused before the submission layer saw them (a schema error while Litestar parsed the body,
JSON too deeply nested to parse, a body the route could not decode): the client has burnt their seq_id all the
same, so when the body still names the caller's model and a seq_id, that seq_id is voided at once. Otherwise the
model would wait the trainer's gap timeout for it and the next optim_step would fail (issue 20, item 6).

Requests refused inside `Gateway.submit` are voided there (the FieldError is marked `voided`); this hook only
covers what never reached it.
"""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Litestar
from litestar.exceptions import HTTPException
from litestar.types import Scope
from litestar.utils.scope.state import ScopeState

from bus_events import EventType
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.gateway import Gateway

log = logging.getLogger(__name__)

# Routes whose body carries a training request's (model_id, seq_id), and the request type a void of it stands for
# (the trainer keeps a gradient window open for voids that were not forward_backwards).
VOIDABLE_ROUTES = {
    "/api/v1/forward_backward": EventType.FORWARD_BACKWARD,
    "/api/v1/forward": EventType.FORWARD_BACKWARD,
    "/fwdbwd": EventType.FORWARD_BACKWARD,
    "/api/v1/optim_step": EventType.OPTIM_STEP,
    "/optim_step": EventType.OPTIM_STEP,
    "/api/v1/save_weights": EventType.SAVE_WEIGHTS,
    "/api/v1/save_weights_for_sampler": EventType.SAVE_WEIGHTS_FOR_SAMPLER,
    "/api/v1/save_weights_external": EventType.SAVE_WEIGHTS_EXTERNAL,
    "/api/v1/load_weights": EventType.LOAD_WEIGHTS,
}

# When the body does not even parse (too deep, a number out of range elsewhere...), the two top-level fields are
# looked for textually. A false match can only name the caller's own model (ownership is checked below).
_MODEL_ID = re.compile(rb'"model_id"\s*:\s*"([^"\\]{1,256})"')
_SEQ_ID = re.compile(rb'"seq_id"\s*:\s*(\d{1,18})\b')


class _Ids(msgspec.Struct):
    model_id: str | None = None
    seq_id: int | None = None


def request_ids(body: bytes) -> tuple[str, int] | None:
    """(model_id, seq_id) of a JSON training request, however broken the rest of the body is."""
    try:
        ids = msgspec.json.decode(body, type=_Ids)
        if ids.model_id is not None and ids.seq_id is not None and ids.seq_id >= 0:
            return ids.model_id, ids.seq_id
        return None
    except (msgspec.DecodeError, RecursionError):
        model, seq = _MODEL_ID.search(body), _SEQ_ID.search(body)
        return (model.group(1).decode(), int(seq.group(1))) if model and seq else None


def _refused_before_submit(exc: Exception) -> bool:
    if isinstance(exc, FieldError):
        return exc.status_code == 400 and not exc.voided
    if isinstance(exc, HTTPException):
        return exc.status_code == 400
    return isinstance(exc, RecursionError)


async def void_refused_request(exc: Exception, scope: Scope) -> None:
    """`after_exception` hook: void the seq_id of a refused training request whose body names one."""
    event_type = VOIDABLE_ROUTES.get(scope.get("path", ""))
    tenant = scope.get("user")
    if event_type is None or not isinstance(tenant, str) or not _refused_before_submit(exc):
        return
    app: Litestar = scope["app"]
    cached = ScopeState.from_scope(scope).body
    body = cached if isinstance(cached, bytes) else None
    ids = request_ids(body) if body else None
    if ids is None:
        return
    gw: Gateway = app.state.gateway
    try:
        await gw.void_refused(ids[0], ids[1], f"{exc}", tenant, event_type)
    except (NotFound, FieldError):  # not the caller's model, or a seq_id it may not void: nothing to do
        return
