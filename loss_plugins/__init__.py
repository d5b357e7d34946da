"""Loss functions for forward_backward: the Tinker built-ins plus plugins (register_loss or the entry-point group
"tinker_bus.losses"). Trainers call compute_loss(); the gateway lists list_losses() at GET /loss_functions."""

from loss_plugins.registry import ENTRY_POINT_GROUP, compute_loss, get_loss, list_losses, register_loss
from loss_plugins.spec import LossFn, LossInputError, LossOutput, LossSpec, UnknownLoss

__all__ = [
    "ENTRY_POINT_GROUP",
    "LossFn",
    "LossInputError",
    "LossOutput",
    "LossSpec",
    "UnknownLoss",
    "compute_loss",
    "get_loss",
    "list_losses",
    "register_loss",
]
