"""The typed boundary between the asyncio side (worker, service) and the engine thread.

A `GenRequest` is one prompt to sample `num_samples` times with one adapter; `GenOutput` or `GenFailure` is its
one answer, delivered through the callback given with it (on the engine thread: callers hop back to their own
loop, e.g. with `loop.call_soon_threadsafe`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bus_events import payloads as p


@dataclass
class AdapterCheckpoint:
    """An adapter as read from S3 (CPU tensors), parsed and loaded into an adapter slot on the engine thread."""

    key: tuple[str, str]  # (tinker path, manifest version)
    checkpoint: Any  # artifact_store.Checkpoint


@dataclass
class GenRequest:
    prompt: list[int]
    params: p.SamplingParams
    adapter: Any = None  # None (base model), a parsed lora.LoraAdapter or an AdapterCheckpoint; both have .key
    first_sample: int = 0  # index of this request's first sample (seeds are per sample index)
    num_samples: int = 1
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0

    @property
    def adapter_key(self) -> Hashable:
        return None if self.adapter is None else self.adapter.key


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: Literal["stop", "length"] = "length"


@dataclass
class GenOutput:
    sequences: list[Sequence]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN at 0
    topk_ids: np.ndarray | None = None  # int32 [P, k], row 0 padding
    topk_logprobs: np.ndarray | None = None  # float32 [P, k]


@dataclass
class GenFailure:
    message: str  # never empty (see describe)
    category: Literal["user", "server"] = "server"


Done = Callable[[GenOutput | GenFailure], None]


def describe(exc: BaseException) -> str:
    """An exception as a message that is never empty: an AssertionError() has no str, but has a type."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else repr(exc)
