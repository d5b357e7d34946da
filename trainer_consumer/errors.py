"""Which failures are the caller's fault ("user") and which are ours ("server"), as the reply's ErrorInfo."""

from __future__ import annotations

from typing import Literal

from artifact_store import CheckpointExists, CheckpointNotFound, InvalidPath
from bus_events import payloads as p
from loss_plugins import LossInputError, UnknownLoss
from trainer_consumer.backends.base import BackendInputError

Category = Literal["user", "server", "unknown"]


class TrainerError(Exception):
    category: Category = "server"

    def __init__(self, message: str, category: Category | None = None):
        super().__init__(message)
        if category is not None:
            self.category = category


class UserError(TrainerError):
    category: Category = "user"


USER_ERRORS: tuple[type[BaseException], ...] = (
    BackendInputError, LossInputError, UnknownLoss, InvalidPath, CheckpointExists, CheckpointNotFound,
)


def error_info(exc: BaseException) -> p.ErrorInfo:
    if isinstance(exc, TrainerError):
        return p.ErrorInfo(message=str(exc), category=exc.category)
    if isinstance(exc, USER_ERRORS):
        return p.ErrorInfo(message=str(exc), category="user")
    return p.ErrorInfo(message=f"internal error ({type(exc).__name__}): {exc}", category="server")
