"""Which failures are the caller's fault ("user") and which are ours ("server"), as the reply's ErrorInfo. The
error classes themselves live in bus_runtime.errors (shared with the sampler)."""

from __future__ import annotations

from artifact_store import CheckpointExists, CheckpointNotFound, InvalidPath
from bus_events import payloads as p
from bus_runtime.errors import ServiceError
from loss_plugins import LossInputError, UnknownLoss
from trainer_consumer.backends.base import BackendInputError

USER_ERRORS: tuple[type[BaseException], ...] = (
    BackendInputError, LossInputError, UnknownLoss, InvalidPath, CheckpointExists, CheckpointNotFound,
)


def error_info(exc: BaseException) -> p.ErrorInfo:
    if isinstance(exc, ServiceError):
        return p.ErrorInfo(message=str(exc), category=exc.category)
    if isinstance(exc, USER_ERRORS):
        return p.ErrorInfo(message=str(exc), category="user")
    return p.ErrorInfo(message=f"internal error ({type(exc).__name__}): {exc}", category="server")

