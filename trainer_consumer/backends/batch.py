"""Checking a forward_backward request's datums and packing them into padded micro-batches.

Shared by every backend: the errors here are the "user" errors of bad input, named by datum and field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bus_events import payloads as p
from loss_plugins import compute_loss
from loss_plugins.registry import resolve
from trainer_consumer.backends.base import BackendInputError, ForwardBackwardOutput

TARGET_TOKENS = "target_tokens"


@dataclass(frozen=True)
class CheckedDatum:
    tokens: np.ndarray  # int64 [N]
    targets: np.ndarray  # int64 [N] or [N, K]
    inputs: dict[str, np.ndarray]  # every other loss_fn_input, float32, shaped like targets

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class MicroBatch:
    """Datums [start, stop) of the request, right-padded to one length (causal attention never looks right)."""

    start: int
    stop: int
    input_ids: torch.Tensor  # int64 [B, L]
    targets: torch.Tensor  # int64 [B, L] or [B, L, K], 0 on padding
    mask: torch.Tensor  # bool [B, L], True on real positions


def check_data(data: Sequence[p.Datum], *, vocab_size: int, max_positions: int | None,
               top_k_targets: bool = True) -> list[CheckedDatum]:
    """`top_k_targets`: whether the backend computes [N, K] target_tokens (one K for the whole request)."""
    if not data:
        raise BackendInputError("forward_backward needs at least one datum")
    checked = [_check_datum(i, d, vocab_size, max_positions) for i, d in enumerate(data)]
    field = f"loss_fn_inputs[{TARGET_TOKENS!r}]"
    for i, datum in enumerate(checked):
        if datum.targets.ndim == 2 and not top_k_targets:
            raise BackendInputError(f"data[{i}].{field} is 2-D; this trainer backend computes 1-D target_tokens only")
        if datum.targets.shape[1:] != checked[0].targets.shape[1:]:
            raise BackendInputError(f"data[{i}].{field} has shape {list(datum.targets.shape)} but data[0]'s has "
                                    f"{list(checked[0].targets.shape)}; every datum of a request needs the same K")
    return checked


def _check_ids(where: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise BackendInputError(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def _check_datum(index: int, datum: p.Datum, vocab_size: int, max_positions: int | None) -> CheckedDatum:
    where = f"data[{index}]"
    tokens = datum.tokens.numpy()
    if tokens.ndim != 1 or tokens.dtype.kind != "i":
        raise BackendInputError(f"{where}.tokens must be a 1-D integer tensor, got {tokens.dtype} {list(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise BackendInputError(f"{where}.tokens is empty")
    if max_positions is not None and tokens.shape[0] > max_positions:  # None: config.json sets no limit
        raise BackendInputError(f"{where} has {tokens.shape[0]} tokens; the model takes at most {max_positions}")
    _check_ids(f"{where}.tokens", tokens, vocab_size)
    if TARGET_TOKENS not in datum.loss_fn_inputs:
        raise BackendInputError(f"{where}.loss_fn_inputs[{TARGET_TOKENS!r}] is missing")
    targets = datum.loss_fn_inputs[TARGET_TOKENS].numpy()
    # [N]: one target per position; [N, K]: K targets per position (top-k distillation), K ≥ 1.
    if targets.ndim not in (1, 2) or targets.shape[0] != tokens.shape[0] or 0 in targets.shape:
        raise BackendInputError(f"{where}.loss_fn_inputs[{TARGET_TOKENS!r}] has shape {list(targets.shape)} but "
                                f"tokens has shape {list(tokens.shape)}; it must be [N] or [N, K] with K ≥ 1, "
                                "aligned with tokens position by position")
    if targets.dtype.kind != "i":
        raise BackendInputError(f"{where}.loss_fn_inputs[{TARGET_TOKENS!r}] must be integers, got {targets.dtype}")
    _check_ids(f"{where}.loss_fn_inputs[{TARGET_TOKENS!r}]", targets, vocab_size)
    inputs: dict[str, np.ndarray] = {}
    for key, tensor in datum.loss_fn_inputs.items():
        if key == TARGET_TOKENS:
            continue
        values = tensor.numpy()
        if values.shape != targets.shape:
            raise BackendInputError(f"{where}.loss_fn_inputs[{key!r}] has shape {list(values.shape)} but "
                                    f"target_tokens has shape {list(targets.shape)}")
        inputs[key] = values.astype(np.float32)
    return CheckedDatum(tokens.astype(np.int64), targets.astype(np.int64), inputs)


def concat_inputs(data: Sequence[CheckedDatum]) -> dict[str, torch.Tensor]:
    """Every loss_fn_input concatenated over the datums; a key must be given for all datums or none."""
    keys = set().union(*(d.inputs for d in data))
    out = {}
    for key in sorted(keys):
        missing = [i for i, d in enumerate(data) if key not in d.inputs]
        if missing:
            raise BackendInputError(f"loss_fn_inputs[{key!r}] is given for some datums but not for data[{missing[0]}]")
        out[key] = torch.from_numpy(np.concatenate([d.inputs[key] for d in data]))
    return out


def plan_micro_batches(data: Sequence[CheckedDatum], max_tokens: int) -> list[MicroBatch]:
    """Consecutive datums grouped so that batch size x padded length stays within `max_tokens` (a datum longer
    than that gets a batch of its own). Request order is kept, so results need no un-sorting."""
    batches: list[MicroBatch] = []
    start = 0
    while start < len(data):
        stop, longest = start + 1, data[start].length
        while stop < len(data):
            longer = max(longest, data[stop].length)
            if longer * (stop - start + 1) > max_tokens:
                break
            stop, longest = stop + 1, longer
        batches.append(_pad(data, start, stop, longest))
        start = stop
    return batches


def _pad(data: Sequence[CheckedDatum], start: int, stop: int, length: int) -> MicroBatch:
    size = stop - start
    input_ids = torch.zeros(size, length, dtype=torch.int64)
    targets = torch.zeros(size, length, *data[start].targets.shape[1:], dtype=torch.int64)
    mask = torch.zeros(size, length, dtype=torch.bool)
    for row, datum in enumerate(data[start:stop]):
        n = datum.length
        input_ids[row, :n] = torch.from_numpy(datum.tokens)
        targets[row, :n] = torch.from_numpy(datum.targets)
        mask[row, :n] = True
    return MicroBatch(start, stop, input_ids, targets, mask)


def run_forward_backward(
    data: Sequence[p.Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str],
    forward_only: bool,
    *,
    vocab_size: int,
    max_positions: int | None,
    micro_batch_tokens: int,
    logprobs_of: Callable[[MicroBatch], torch.Tensor],
    top_k_targets: bool = True,
) -> ForwardBackwardOutput:
    """The forward_backward plan every backend shares; `logprobs_of(batch)` runs the active adapter's model.

    One graph when one micro-batch holds the request. Otherwise logprobs without graph for the whole request, the
    loss and its gradient w.r.t. those logprobs, then one forward+backward per micro-batch fed that gradient: exactly
    the gradient of the loss over the whole request, with activations for one micro-batch at a time.
    """
    resolve(loss_fn, loss_fn_config)  # an unknown loss (or custom loss graph) fails before any compute
    checked = check_data(data, vocab_size=vocab_size, max_positions=max_positions, top_k_targets=top_k_targets)
    inputs = concat_inputs(checked)
    lengths = [d.length for d in checked]
    batches = plan_micro_batches(checked, micro_batch_tokens)
    if forward_only or len(batches) > 1:
        with torch.no_grad():
            logprobs = torch.cat([logprobs_of(batch) for batch in batches])
    if forward_only:
        loss = compute_loss(loss_fn, logprobs, inputs, loss_fn_config, lengths)
    elif len(batches) == 1:
        logprobs = logprobs_of(batches[0])
        loss = compute_loss(loss_fn, logprobs, inputs, loss_fn_config, lengths)
        loss.loss.backward()
    else:
        logprobs = logprobs.detach().requires_grad_()
        loss = compute_loss(loss_fn, logprobs, inputs, loss_fn_config, lengths)
        loss.loss.backward()
        upstream, offset = logprobs.grad, 0
        assert upstream is not None  # the loss was computed from these logprobs
        for batch in batches:
            count = int(batch.mask.sum())
            logprobs_of(batch).backward(upstream[offset:offset + count])
            offset += count
    flat = logprobs.detach().float().cpu().numpy()
    splits = np.cumsum(lengths)[:-1]
    return ForwardBackwardOutput(logprobs=list(np.split(flat, splits)),
                                 metrics={k: float(v) for k, v in loss.metrics.items()})
