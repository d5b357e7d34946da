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
    topk_sample_logprobs: int = 0  # k most likely tokens at each sampled position
    target_prompt_ids: np.ndarray | None = None  # int64 [P - 1, K]: ids to score at positions 1.., -1 = none
    prompt_alt_tokens_k: int = 0  # draws at each prompt position 1.. at the request's temperature
    cache_namespace: str = ""  # the tenant: prefix-cache entries are shared within it only

    @property
    def adapter_key(self) -> Hashable:
        return None if self.adapter is None else self.adapter.key

    @property
    def prefix_key(self) -> Hashable:
        """What cached KV must match besides the tokens: the adapter version, within the tenant's namespace (so
        prompt_cache_hit_tokens never tells one tenant what another sent)."""
        return (self.cache_namespace, self.adapter_key)

    @property
    def wants_prompt_extras(self) -> bool:
        """Outputs of this request's own (target ids, its seed): its prompt is prefilled apart from others."""
        return self.target_prompt_ids is not None or self.prompt_alt_tokens_k > 0


@dataclass
class Sequence:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    stop_reason: Literal["stop", "length"] = "length"
    # topk_sample_logprobs: one (ids int32 [k], logprobs float32 [k]) pair per token, in token order
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class GenOutput:
    sequences: list[Sequence]
    prompt_logprobs: np.ndarray | None = None  # float32 [P], NaN at 0
    topk_ids: np.ndarray | None = None  # int32 [P, k], row 0 padding
    topk_logprobs: np.ndarray | None = None  # float32 [P, k]
    prompt_cache_hit_tokens: int = 0  # prompt positions whose KV the prefix cache gave (not recomputed)
    target_logprobs: np.ndarray | None = None  # float32 [P - 1, K], NaN where target_prompt_ids is -1
    alt_tokens: np.ndarray | None = None  # int32 [P - 1, k]
    alt_logprobs: np.ndarray | None = None  # float32 [P - 1, k]


@dataclass
class GenFailure:
    message: str  # never empty (see describe)
    category: Literal["user", "server"] = "server"


Done = Callable[[GenOutput | GenFailure], None]


def describe(exc: BaseException) -> str:
    """An exception as a message that is never empty: an AssertionError() has no str, but has a type."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else repr(exc)
