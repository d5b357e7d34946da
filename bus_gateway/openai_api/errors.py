"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, which OpenAI clients turn into
their typed exceptions (BadRequestError, AuthenticationError, NotFoundError, RateLimitError...)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from bus_gateway.errors import FieldError, NotFound

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}
# Our payload-level names for fields OpenAI requests carry at the top level.
WIRE_PREFIX = "sampling_params."


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def _param(field: str | None) -> str | None:
    if not field:
        return None
    field = field.removeprefix("$.").removeprefix(WIRE_PREFIX)
    return field


def field_error(_: Request, exc: FieldError) -> Response:
    param = _param(exc.field)
    return Response(error_body(exc.status_code, f"{param}: {exc.message}", param,
                               "model_not_found" if exc.status_code == 404 and param == "model" else None),
                    status_code=exc.status_code)


def not_found(_: Request, exc: NotFound) -> Response:
    return Response(error_body(404, str(exc)), status_code=404)


def http_error(_: Request, exc: HTTPException) -> Response:
    """Litestar's own (body validation: its `extra` names the field; 401 from the key check; 429 ...)."""
    param, message = None, exc.detail or type(exc).__name__
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        param = _param(extra[0].get("key"))
        detail = extra[0].get("message") or message
        message = f"{param}: {detail}" if param else detail
    return Response(error_body(exc.status_code, message, param), status_code=exc.status_code, headers=exc.headers)


EXCEPTION_HANDLERS = {FieldError: field_error, NotFound: not_found, HTTPException: http_error}
