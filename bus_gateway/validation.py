"""Checks done at the gateway before anything reaches the bus, each failing with a FieldError naming the field:
token ids inside the model's vocabulary, loss_fn_inputs aligned with model_input, finite numbers, a known
loss_fn with its required inputs and known config keys, checkpoint names and tinker:// paths, and the bus
payloads' own checks."""

from __future__ import annotations

import math
import re
from typing import Any, TypeVar

import msgspec
import numpy as np

from artifact_store import InvalidPath, TinkerPath, check_name
from bus_events import Tensor
from bus_events import payloads as p
from bus_events.ids import is_model_id
from bus_gateway.errors import FieldError
from bus_gateway.tinker_api.schemas import ID_PATTERN
from loss_plugins import UnknownLoss
from loss_plugins.custom_graph import CustomLossError
from loss_plugins.registry import resolve

MAX_DATUMS = 100_000
EPHEMERAL_PREFIX = "ephemeral-"
S = TypeVar("S", bound=msgspec.Struct)


def build(cls: type[S], field: str, **values: Any) -> S:
    """Construct a bus payload struct; its own checks (__post_init__) become a FieldError on `field`, or on
    `field.<name>` when the check's message starts with one of the struct's field names (e.g. `top_k must ...`)."""
    try:
        return cls(**values)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        message = str(exc)
        named = message.split(" ", 1)[0].rsplit(".", 1)[-1]  # "adam_params.beta1 must ..." names beta1 too
        raise FieldError(f"{field}.{named}" if named in cls.__struct_fields__ else field, message) from exc


def text_only(field: str, kind: str) -> FieldError:
    """The 400 for an image, image_asset_pointer or dmel chunk: they need a vision (or audio) model."""
    return FieldError(field, f"{kind or 'empty'} chunks are not supported: the models tinker-bus serves are "
                             "text-only (no vision or audio encoder), so send encoded_text chunks only")


def check_model_id(model_id: str, field: str = "model_id") -> str:
    """A `<session_id>:train:<n>` id whose every character may appear in an object-store key segment."""
    if not (re.match(ID_PATTERN, model_id) and is_model_id(model_id)):
        raise FieldError(field, f"{model_id[:300]!r} is not a model id (<session_id>:train:<n>, session ids use "
                                "letters, digits and . _ : -)")
    return model_id


def checkpoint_name(name: str | None, field: str = "path") -> str:
    if not name:
        raise FieldError(field, "required: the checkpoint name")
    try:
        check_name(name)
    except InvalidPath as exc:
        raise FieldError(field, str(exc)) from exc
    if name.startswith(EPHEMERAL_PREFIX):
        raise FieldError(field, f"names starting with {EPHEMERAL_PREFIX!r} are reserved for ephemeral sampler saves")
    return name


def parse_path(path: str, field: str = "path") -> TinkerPath:
    try:
        parsed = TinkerPath.parse(path)
    except InvalidPath as exc:
        raise FieldError(field, str(exc)) from exc
    if not re.match(ID_PATTERN, parsed.run_id):
        raise FieldError(field, f"{parsed.run_id!r} is not a training run id")
    return parsed


def check_token_ids(tokens: np.ndarray, vocab_size: int, field: str) -> None:
    if tokens.size == 0:
        return
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        position = np.unravel_index(int(bad[0]), tokens.shape)
        where = position[0] if len(position) == 1 else tuple(int(i) for i in position)
        raise FieldError(field, f"token id {int(tokens.flat[bad[0]])} at position {where} is outside the "
                                f"model's vocabulary [0, {vocab_size})")


def check_finite(values: np.ndarray, field: str) -> None:
    if values.dtype.kind != "f" or values.size == 0:
        return
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise FieldError(field, f"{values.flat[bad[0]]} at position {int(bad[0])} is not a finite number")


def check_loss_fn(loss_fn: str, loss_fn_config: dict[str, float | str]) -> tuple[str, ...]:
    """The loss's required inputs, after checking the name and the config keys."""
    try:
        spec, config = resolve(loss_fn, loss_fn_config)  # custom: the stored graph's spec, no config
    except CustomLossError as exc:
        raise FieldError(exc.field, exc.detail) from exc
    except UnknownLoss as exc:
        raise FieldError("loss_fn", str(exc)) from exc
    for key, value in config.items():
        if key not in spec.config_defaults:
            allowed = ", ".join(sorted(spec.config_defaults)) or "none"
            raise FieldError(f"loss_fn_config.{key}", f"unknown key for loss_fn {loss_fn!r} (allowed: {allowed})")
        if isinstance(value, str) or not math.isfinite(value):
            raise FieldError(f"loss_fn_config.{key}", f"must be a finite number, got {value!r}")
    return spec.required_inputs


def _check_input(name: str, tensor: Tensor, length: int, target_shape: tuple[int, ...] | None,
                 vocab_size: int, field: str) -> None:
    values = tensor.numpy()
    if values.ndim not in (1, 2) or values.shape[0] != length:
        raise FieldError(field, f"shape {list(values.shape)} does not match model_input length {length} "
                                "(every loss_fn_input needs one entry per model_input token)")
    if target_shape is not None and values.shape != target_shape:
        raise FieldError(field, f"shape {list(values.shape)} differs from target_tokens shape {list(target_shape)}")
    if values.ndim == 2 and values.shape[1] == 0:
        raise FieldError(field, f"shape {list(values.shape)}: [N, K] inputs need K ≥ 1 targets per position")
    if name == "target_tokens":
        check_token_ids(values, vocab_size, field)
    else:
        check_finite(values, field)


def validate_forward_backward(fb: p.ForwardBackward, vocab_size: int) -> None:
    required = check_loss_fn(fb.loss_fn, fb.loss_fn_config)
    if not fb.data:
        raise FieldError("data", "at least one datum is required")
    if len(fb.data) > MAX_DATUMS:
        raise FieldError("data", f"{len(fb.data)} datums is more than {MAX_DATUMS} per request")
    for i, datum in enumerate(fb.data):
        where = f"data[{i}]"
        tokens = datum.tokens.numpy()
        if tokens.ndim != 1 or tokens.size == 0:
            raise FieldError(f"{where}.model_input", "needs at least one token")
        check_token_ids(tokens, vocab_size, f"{where}.model_input")
        missing = [name for name in required if name not in datum.loss_fn_inputs]
        if missing:  # name them all, so a client fixes its request once
            raise FieldError(f"{where}.loss_fn_inputs.{missing[0]}",
                             f"required by loss_fn {fb.loss_fn!r}; missing: {', '.join(missing)}")
        if "target_tokens" not in datum.loss_fn_inputs:
            raise FieldError(f"{where}.loss_fn_inputs.target_tokens", "required (the tokens model_input predicts)")
        target = datum.loss_fn_inputs["target_tokens"]
        _check_input("target_tokens", target, tokens.size, None, vocab_size,
                     f"{where}.loss_fn_inputs.target_tokens")
        first = fb.data[0].loss_fn_inputs["target_tokens"]
        if tuple(target.shape[1:]) != tuple(first.shape[1:]):  # the trainer stacks every datum's K targets
            raise FieldError(f"{where}.loss_fn_inputs.target_tokens",
                             f"shape {list(target.shape)} but data[0]'s is {list(first.shape)}: every datum of a "
                             "request needs the same number K of targets per position")
        for name, tensor in datum.loss_fn_inputs.items():
            if name != "target_tokens":
                _check_input(name, tensor, tokens.size, tuple(target.shape), vocab_size,
                             f"{where}.loss_fn_inputs.{name}")


def validate_prompt(prompt: np.ndarray, vocab_size: int, max_context: int | None, max_tokens: int,
                    field: str = "prompt") -> None:
    if prompt.size == 0:
        raise FieldError(field, "needs at least one token")
    check_token_ids(prompt, vocab_size, field)
    if max_context is not None and prompt.size + max_tokens > max_context:
        raise FieldError(field, f"{prompt.size} prompt tokens + max_tokens {max_tokens} exceed the model's "
                                f"context of {max_context} tokens")
