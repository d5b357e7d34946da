"""The loss registry: built-ins, register_loss(), plugins from the entry-point group "tinker_bus.losses", and
compute_loss(), which validates a request's inputs and config before any loss function sees them."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import numbers
import threading
from collections.abc import Iterable, Mapping

import torch

from loss_plugins.builtin import BUILTIN_LOSSES, CLIP_HIGH, CLIP_LOW
from loss_plugins.spec import LossFn, LossInputError, LossOutput, LossSpec, UnknownLoss

ENTRY_POINT_GROUP = "tinker_bus.losses"

_log = logging.getLogger(__name__)
_lock = threading.RLock()  # re-entrant: an entry-point callable calls register_loss while plugins are loading
_losses: dict[str, LossSpec] = {spec.name: spec for spec in BUILTIN_LOSSES}
_entry_points_loaded = False


def register_loss(name: str, fn: LossFn, *, description: str, required_inputs: Iterable[str] = (),
                  config_defaults: Mapping[str, float] | None = None,
                  input_defaults: Mapping[str, float] | None = None, replace: bool = False) -> LossSpec:
    """Register a server-side loss. `input_defaults` names optional per-token inputs and the value compute_loss
    fills them with when absent; `replace=True` is needed to redefine a registered name (built-ins included)."""
    spec = LossSpec(name=name, fn=fn, description=description, required_inputs=tuple(required_inputs),
                    config_defaults=config_defaults or {}, input_defaults=input_defaults or {})
    _add(spec, replace=replace)
    return spec


def _add(spec: LossSpec, *, replace: bool) -> None:
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"a loss name must be a non-empty string, got {spec.name!r}")
    if not callable(spec.fn):
        raise TypeError(f"loss {spec.name!r}: fn must be callable")
    for key, value in {**spec.config_defaults, **spec.input_defaults}.items():
        if not _is_finite_number(value):
            raise ValueError(f"loss {spec.name!r}: default for {key!r} must be a finite number, got {value!r}")
    with _lock:
        existing = _losses.get(spec.name)
        if existing is not None and existing != spec and not replace:
            raise ValueError(f"loss {spec.name!r} is already registered (pass replace=True to redefine it)")
        _losses[spec.name] = spec


def _load_entry_points() -> None:
    """Load plugins once, on first use. A broken plugin is logged and skipped; it must not take the server down."""
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True  # set first, so a plugin that calls get_loss() does not recurse
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = entry_point.load()
                if isinstance(loaded, LossSpec):
                    _add(loaded, replace=False)
                elif callable(loaded):
                    loaded()
                else:
                    raise TypeError(f"expected a LossSpec or a zero-argument callable, got {type(loaded).__name__}")
            except Exception:
                _log.warning("ignoring loss plugin %r = %r from group %s", entry_point.name, entry_point.value,
                             ENTRY_POINT_GROUP, exc_info=True)


def get_loss(name: str) -> LossSpec:
    _load_entry_points()
    with _lock:
        spec = _losses.get(name)
        if spec is None:
            raise UnknownLoss(f"unknown loss_fn {name!r}; known losses: {', '.join(sorted(_losses))}")
        return spec


def list_losses() -> list[LossSpec]:
    _load_entry_points()
    with _lock:
        return [_losses[name] for name in sorted(_losses)]


def compute_loss(name: str, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str] | None) -> LossOutput:
    """Validate, fill defaults, and run loss `name`. Inputs are cast to target_logprobs' dtype and device (the
    caller picks the compute precision); inputs the loss does not read are ignored."""
    spec = get_loss(name)
    _check_target_logprobs(target_logprobs)
    full_config = _checked_config(spec, config or {})
    checked_inputs = _checked_inputs(spec, target_logprobs, inputs)
    _check_clip_bounds(checked_inputs, full_config)
    output = spec.fn(target_logprobs, checked_inputs, full_config)
    _check_output(spec.name, output)
    return output


def _is_finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _first_index(flags: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in flags.nonzero()[0])


def _position(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(index)


def _check_target_logprobs(target_logprobs: torch.Tensor) -> None:
    if not isinstance(target_logprobs, torch.Tensor) or not target_logprobs.is_floating_point():
        raise LossInputError("target_logprobs must be a floating-point tensor")
    if target_logprobs.dim() not in (1, 2):
        raise LossInputError(f"target_logprobs must be [T] or [T, K], got shape {list(target_logprobs.shape)}")
    _check_finite("target_logprobs", target_logprobs)


def _check_finite(field: str, tensor: torch.Tensor) -> None:
    values = tensor.detach()
    bad = ~torch.isfinite(values)
    if bad.any():
        index = _first_index(bad)
        value = float(values[index])
        kind = "NaN" if math.isnan(value) else str(value)  # "inf" or "-inf"
        raise LossInputError(f"{field} contains {kind} at position {_position(index)}")


def _checked_config(spec: LossSpec, config: Mapping[str, float | str]) -> dict[str, float]:
    full = dict(spec.config_defaults)
    for key, value in config.items():
        if key not in spec.config_defaults:
            allowed = ", ".join(sorted(spec.config_defaults)) or "none"
            raise LossInputError(f"unknown loss_fn_config key {key!r} for loss_fn {spec.name!r} (allowed: {allowed})")
        if not _is_finite_number(value):
            raise LossInputError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        full[key] = float(value)
    return full


def _checked_inputs(spec: LossSpec, target_logprobs: torch.Tensor,
                    inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for key in spec.required_inputs:
        if key not in inputs:
            raise LossInputError(f"loss_fn {spec.name!r} requires loss_fn_inputs[{key!r}], which is missing")
    checked: dict[str, torch.Tensor] = {}
    for key in spec.accepted_inputs:
        if key in inputs:
            checked[key] = _checked_tensor(key, inputs[key], target_logprobs)
        elif key in spec.input_defaults:
            checked[key] = torch.full_like(target_logprobs, spec.input_defaults[key], requires_grad=False)
    return checked


def _checked_tensor(field: str, value: object, target_logprobs: torch.Tensor) -> torch.Tensor:
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LossInputError(f"{field} is not a numeric tensor: {exc}") from exc
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise LossInputError(f"{field} must be real numbers, got dtype {tensor.dtype}")
    if tensor.shape != target_logprobs.shape:
        raise LossInputError(f"{field} has shape {list(tensor.shape)} but target_logprobs has shape "
                             f"{list(target_logprobs.shape)}; every loss_fn_input must align with target_tokens")
    tensor = tensor.to(dtype=target_logprobs.dtype, device=target_logprobs.device)
    _check_finite(field, tensor)
    return tensor


def _check_clip_bounds(inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> None:
    if CLIP_LOW not in config or CLIP_HIGH not in config:
        return
    low, high = inputs.get(CLIP_LOW, config[CLIP_LOW]), inputs.get(CLIP_HIGH, config[CLIP_HIGH])
    inverted = torch.as_tensor(low, dtype=torch.float64) > torch.as_tensor(high, dtype=torch.float64)
    if inverted.any():
        where = f" at position {_position(_first_index(inverted))}" if inverted.dim() else ""
        raise LossInputError(f"{CLIP_LOW} is greater than {CLIP_HIGH}{where}")


def _check_output(name: str, output: LossOutput) -> None:
    """A plugin's bad metric key would crash the SDK client (it splits keys on ':'), so fail here instead."""
    loss, metrics = output
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError(f"loss {name!r} must return a scalar tensor as its loss")
    if "loss:sum" not in metrics:
        raise ValueError(f"loss {name!r} returned no 'loss:sum' metric")
    for key in metrics:
        if key.count(":") != 1:
            raise ValueError(f"loss {name!r} returned metric key {key!r}; keys must be 'name:reduction'")
