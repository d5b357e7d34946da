"""Client errors that name the offending field, and how they reach the wire."""

from __future__ import annotations

import json
import math
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.utils.scope.state import ScopeState


class FieldError(ValueError):
    """Bad input: `field` is a dotted path into the request (e.g. `data[2].loss_fn_inputs.advantages`)."""

    def __init__(self, field: str, message: str, status_code: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code
        self.voided = False  # its training seq_id was voided on the bus already (Gateway.submit)


class NotYetKnown(LookupError):
    """A well-formed request id this gateway has not read yet while its bus listener is still catching up: any
    gateway may have promised it, so the answer is "try again", never "unknown"."""


class NotFound(LookupError):
    """A thing that does not exist, or belongs to another tenant (indistinguishable on purpose)."""


def field_error_response(_: Request, exc: FieldError) -> Response:
    return Response({"detail": str(exc), "field": exc.field}, status_code=exc.status_code)


def not_found_response(_: Request, exc: NotFound) -> Response:
    return Response({"detail": str(exc)}, status_code=404)


def too_deep_response(_: Request, exc: RecursionError) -> Response:
    """JSON (or protobuf) nested deeper than the parser recurses: the client's fault, not a 500."""
    return Response({"detail": f"body: nested too deeply to parse ({exc})", "field": "body"}, status_code=400)


def _non_finite_path(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path or "body"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite_path(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def out_of_range_field(body: bytes) -> str | None:
    """Where a JSON body holds a number no float can (1e999): msgspec only says `$[...][...]`. Python's json
    reads such a number as inf, so the path of the first non-finite value is the field."""
    try:
        return _non_finite_path(json.loads(body), "")
    except (ValueError, RecursionError):
        return None


def http_error_response(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors, with `detail` always a non-empty string (an empty 400 makes the SDK retry), naming
    the field when the parser could not."""
    if exc.status_code == 400 and "out of range" in (exc.detail or ""):
        raw = ScopeState.from_scope(request.scope).body
        field = out_of_range_field(raw) if isinstance(raw, bytes) else None
        if field is not None:
            return Response({"detail": f"{field}: number out of range (must fit a 64-bit float)", "field": field,
                             "status_code": 400}, status_code=400)
    body: dict[str, object] = {"detail": exc.detail or type(exc).__name__, "status_code": exc.status_code}
    if exc.extra:
        body["extra"] = exc.extra
    return Response(body, status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS = {FieldError: field_error_response, NotFound: not_found_response,
                      HTTPException: http_error_response, RecursionError: too_deep_response}
