"""Client errors that name the offending field, and how they reach the wire."""

from __future__ import annotations

from litestar import Request, Response
from litestar.exceptions import HTTPException


class FieldError(ValueError):
    """Bad input: `field` is a dotted path into the request (e.g. `data[2].loss_fn_inputs.advantages`)."""

    def __init__(self, field: str, message: str, status_code: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status_code = status_code


class NotFound(LookupError):
    """A thing that does not exist, or belongs to another tenant (indistinguishable on purpose)."""


def field_error_response(_: Request, exc: FieldError) -> Response:
    return Response({"detail": str(exc), "field": exc.field}, status_code=exc.status_code)


def not_found_response(_: Request, exc: NotFound) -> Response:
    return Response({"detail": str(exc)}, status_code=404)


def http_error_response(_: Request, exc: HTTPException) -> Response:
    """Litestar's own errors, with `detail` always a non-empty string (an empty 400 makes the SDK retry)."""
    body: dict[str, object] = {"detail": exc.detail or type(exc).__name__, "status_code": exc.status_code}
    if exc.extra:
        body["extra"] = exc.extra
    return Response(body, status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS = {FieldError: field_error_response, NotFound: not_found_response,
                      HTTPException: http_error_response}
