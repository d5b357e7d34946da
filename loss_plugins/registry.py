"""The loss registry: built-ins, register_loss(), plugins from the entry-point group "tinker_bus.losses", and
compute_loss(), which validates a request's inputs and config before any loss function sees them."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import numbers
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from loss_plugins.catalog import BUILTIN_LOSSES, UNSERVED_LOSSES
from loss_plugins.spec import DATUM_INDEX, LossFn, LossInputError, LossOutput, LossSpec, UnknownLoss

if TYPE_CHECKING:  # torch loads with the first compute_loss (checks.py), never with the registry
    import torch

ENTRY_POINT_GROUP = "tinker_bus.losses"
CUSTOM = "custom"  # SDK 0.38's server-side custom loss: loss_fn_config names the stored graph (custom_graph.py)

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
        if spec is None and name in UNSERVED_LOSSES:
            raise UnknownLoss(f"loss_fn {name!r} is not served here: {UNSERVED_LOSSES[name]}")
        if spec is None:
            raise UnknownLoss(f"unknown loss_fn {name!r}; known losses: {', '.join(sorted(_losses))}")
        return spec


def list_losses() -> list[LossSpec]:
    _load_entry_points()
    with _lock:
        return [_losses[name] for name in sorted(_losses)]


def compute_loss(name: str, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str] | None, datum_lengths: Sequence[int] | None = None) -> LossOutput:
    """Validate, fill defaults, and run loss `name`. Inputs are cast to target_logprobs' dtype and device (the
    caller picks the compute precision); inputs the loss does not read are ignored. `datum_lengths` splits the
    tokens into the request's datums (None: one datum), for the losses that work datum by datum."""
    from loss_plugins import checks  # torch: only where a loss is computed

    spec, config = resolve(name, config or {})
    finite = checks.FiniteChecks()
    checks.check_target_logprobs(target_logprobs, finite)
    try:
        full_config = checked_config(spec, config)
        checked_inputs = checks.checked_inputs(spec, target_logprobs, inputs, finite)
        checks.check_clip_bounds(checked_inputs, full_config)
        if spec.per_datum:
            checked_inputs[DATUM_INDEX] = checks.datum_index(target_logprobs, datum_lengths)
        output = spec.fn(target_logprobs, checked_inputs, full_config)
    except Exception:
        # A finiteness check queued before the failure would have raised first had it run at once: it wins.
        finite.raise_first()
        raise
    finite.raise_first()  # on an accelerator: read back with the loss, whose metrics synchronise anyway
    checks.check_output(spec.name, output)
    return output


def resolve(name: str, config: Mapping[str, float | str]) -> tuple[LossSpec, Mapping[str, float | str]]:
    """The spec that computes loss `name` with `config`, and the config it takes. A custom loss (loss_fn "custom")
    is the traced graph its config carries, with no numeric config of its own."""
    if name == CUSTOM:
        from loss_plugins.custom_graph import spec_of_config  # torch-free; the graph is built on first call

        return spec_of_config(config), {}
    return get_loss(name), config


def checked_config(spec: LossSpec, config: Mapping[str, float | str]) -> dict[str, float]:
    """loss_fn_config with defaults filled in; unknown keys and non-finite values are a LossInputError."""
    full = dict(spec.config_defaults)
    for key, value in config.items():
        if key not in spec.config_defaults:
            allowed = ", ".join(sorted(spec.config_defaults)) or "none"
            raise LossInputError(f"unknown loss_fn_config key {key!r} for loss_fn {spec.name!r} (allowed: {allowed})")
        if not _is_finite_number(value):
            raise LossInputError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        full[key] = float(value)
    return full


def _is_finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
