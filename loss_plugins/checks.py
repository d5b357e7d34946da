"""compute_loss's checks on tensors: the request's per-token inputs and the loss's output. Imported when the first
loss is computed, so describing and looking up losses needs no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from loss_plugins.catalog import CLIP_HIGH, CLIP_LOW
from loss_plugins.spec import LossInputError, LossOutput, LossSpec


def _first_index(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in flags.nonzero()[0])


def _position(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(index)


class FiniteChecks:
    """The finiteness checks of one compute_loss. On the CPU each runs at once; on an accelerator each is one
    reduction on the device and `raise_first()` reads them all back in ONE host sync, after the loss was queued:
    a check per tensor used to stop the host before the loss (and the backward behind it) could be queued, for
    ~10 % of a GPU step's host samples (docs/benchmarks.md, issue 14). The error raised is the same either way:
    the first non-finite tensor in check order, its first bad position and value."""

    def __init__(self, defer: bool | None = None) -> None:
        self.defer = defer  # None: defer the checks of tensors off the CPU (no device to overlap with there)
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def add(self, field: str, tensor: torch.Tensor) -> None:
        values = tensor.detach()
        if not (values.device.type != "cpu" if self.defer is None else self.defer):
            _raise_if_not_finite(field, values)
        else:
            self._pending.append((field, values, torch.isfinite(values).all()))

    def raise_first(self) -> None:
        if not self._pending:
            return
        finite = torch.stack([ok for _, _, ok in self._pending]).tolist()  # the one sync
        for (field, values, _), ok in zip(self._pending, finite, strict=True):
            if not ok:
                _raise_if_not_finite(field, values)


def check_target_logprobs(target_logprobs: torch.Tensor, finite: FiniteChecks) -> None:
    if not isinstance(target_logprobs, torch.Tensor) or not target_logprobs.is_floating_point():
        raise LossInputError("target_logprobs must be a floating-point tensor")
    if target_logprobs.dim() not in (1, 2):
        raise LossInputError(f"target_logprobs must be [T] or [T, K], got shape {list(target_logprobs.shape)}")
    finite.add("target_logprobs", target_logprobs)


def _raise_if_not_finite(field: str, values: torch.Tensor) -> None:
    bad = ~torch.isfinite(values)
    if bad.any():
        index = _first_index(bad)
        value = float(values[index])
        kind = "NaN" if math.isnan(value) else str(value)  # "inf" or "-inf"
        raise LossInputError(f"{field} contains {kind} at position {_position(index)}")


def checked_inputs(spec: LossSpec, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                   finite: FiniteChecks) -> dict[str, torch.Tensor]:
    for key in spec.required_inputs:
        if key not in inputs:
            raise LossInputError(f"loss_fn {spec.name!r} requires loss_fn_inputs[{key!r}], which is missing")
    checked: dict[str, torch.Tensor] = {}
    for key in spec.accepted_inputs:
        if key in inputs:
            checked[key] = _checked_tensor(key, inputs[key], target_logprobs, finite)
        elif key in spec.input_defaults:
            checked[key] = torch.full_like(target_logprobs, spec.input_defaults[key], requires_grad=False)
    return checked


def _checked_tensor(field: str, value: object, target_logprobs: torch.Tensor, finite: FiniteChecks) -> torch.Tensor:
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LossInputError(f"{field} is not a numeric tensor: {exc}") from exc
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise LossInputError(f"{field} must be real numbers, got dtype {tensor.dtype}")
    if tensor.shape != target_logprobs.shape:
        raise LossInputError(f"{field} has shape {list(tensor.shape)} but target_logprobs has shape "
                             f"{list(target_logprobs.shape)}; every loss_fn_input must align with target_tokens")
    tensor = tensor.to(dtype=target_logprobs.dtype)
    if tensor.device != target_logprobs.device and target_logprobs.device.type == "cuda":
        # Page-locked and asynchronous: a copy from pageable memory makes the host wait for the whole forward
        # pass queued before it (35 % of a pipelined GPU run's compute-thread samples, docs/benchmarks.md).
        tensor = tensor.pin_memory().to(target_logprobs.device, non_blocking=True)
    tensor = tensor.to(device=target_logprobs.device)
    finite.add(field, tensor)
    return tensor


def check_clip_bounds(inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> None:
    if CLIP_LOW not in config or CLIP_HIGH not in config:
        return
    low, high = inputs.get(CLIP_LOW, config[CLIP_LOW]), inputs.get(CLIP_HIGH, config[CLIP_HIGH])
    inverted = torch.as_tensor(low, dtype=torch.float64) > torch.as_tensor(high, dtype=torch.float64)
    if inverted.any():
        where = f" at position {_position(_first_index(inverted))}" if inverted.dim() else ""
        raise LossInputError(f"{CLIP_LOW} is greater than {CLIP_HIGH}{where}")


def check_output(name: str, output: LossOutput) -> None:
    """A plugin's bad metric key would crash the SDK client (it splits keys on ':'), so fail here instead."""
    loss, metrics = output
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"loss {name!r} must return a scalar tensor as its loss")
    if "loss:sum" not in metrics:
        raise ValueError(f"loss {name!r} returned no 'loss:sum' metric")
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"loss {name!r} returned metric key {key!r}; keys must be 'name:reduction'")


def datum_index(target_logprobs: torch.Tensor, datum_lengths: Sequence[int] | None) -> torch.Tensor:
    """int64 [T]: each token's datum number, from the datums' lengths (None: all tokens are one datum)."""
    total = target_logprobs.shape[0]
    lengths = [total] if datum_lengths is None else list(datum_lengths)
    if sum(lengths) != total or any(n < 0 for n in lengths):
        raise LossInputError(f"datum lengths {lengths} do not add up to the {total} positions of target_logprobs")
    counts = torch.tensor(lengths, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(lengths)), counts).to(target_logprobs.device)
