"""The data types every loss shares: what a loss function takes, what it returns, and how it is described."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # a loss is described without torch: the gateway validates names and config, torch-free
    import torch


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, SUM-reduced over every token of every datum (no normalisation)
    metrics: dict[str, float]  # keys "name:reduction" (exactly one colon), always includes "loss:sum"


# fn(target_logprobs, inputs, config): target_logprobs = learner log p(target_tokens), all datums concatenated
# along dim 0 ([T] or [T, K]); inputs = the other loss_fn_inputs concatenated the same way, already validated and
# cast to target_logprobs' dtype; config = loss_fn_config with defaults filled in.
LossFn = Callable[["torch.Tensor", Mapping[str, "torch.Tensor"], Mapping[str, float | str]], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    description: str
    required_inputs: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    # Optional per-token inputs and the constant compute_loss fills them with when a request omits them
    # (cross_entropy: weights -> 1.0). Config keys may also arrive as per-token inputs; those need no entry here.
    input_defaults: Mapping[str, float] = field(default_factory=dict)
    # The loss works datum by datum (a sequence-level ratio, a per-datum custom loss): compute_loss then adds
    # inputs[DATUM_INDEX], each token's datum number (int64 [T], 0-based), which no request can set.
    per_datum: bool = False

    @property
    def accepted_inputs(self) -> tuple[str, ...]:
        """Every per-token input this loss reads: required, optional, and per-token overrides of config keys."""
        return (*self.required_inputs, *self.input_defaults, *self.config_defaults)

    def __post_init__(self) -> None:
        # Frozen means frozen: a registered loss's defaults must not change under a running trainer.
        object.__setattr__(self, "required_inputs", tuple(self.required_inputs))
        object.__setattr__(self, "config_defaults", MappingProxyType(dict(self.config_defaults)))
        object.__setattr__(self, "input_defaults", MappingProxyType(dict(self.input_defaults)))


# The input compute_loss adds for a per_datum loss: which datum of the request each token belongs to.
DATUM_INDEX = "datum_index"


class UnknownLoss(ValueError):
    """The requested loss_fn is not registered."""


class LossInputError(ValueError):
    """A loss_fn_input or loss_fn_config value is missing, misshapen, non-finite or not allowed."""
