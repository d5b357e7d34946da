"""Failures a worker answers instead of crashing: each becomes the reply's ErrorInfo(message, category). One home
for every worker (trainer, sampler), below both."""

from __future__ import annotations

from bus_events.payloads import ErrorCategory

Category = ErrorCategory


class ServiceError(Exception):
    """An expected failure of a request; "server" unless said otherwise."""

    category: Category = "server"

    def __init__(self, message: str, category: Category | None = None):
        if not message:
            raise ValueError("a ServiceError needs a message: it is what the client reads")
        super().__init__(message)
        if category is not None:
            self.category = category


class UserError(ServiceError):
    """The request cannot be served as asked (the caller's fault): category "user"."""

    category: Category = "user"
