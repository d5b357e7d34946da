"""Trainer-only settings (the bus-wide ones live in tinker_bus.settings.BusSettings).

Read from TINKER_BUS_TRAINER_* environment variables by `TrainerConfig.from_env()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class TrainerConfig:
    # How long a model waits for a missing seq_id before declaring it void (the SDK burns seq ids of requests
    # that finally failed; normally the gateway says so with a seq_void event first).
    gap_timeout_s: float = 30.0
    # Results kept per model to answer duplicated (model_id, seq_id) events without applying them again.
    dedupe_results_per_model: int = 256
    # A partition is paused while this many of its events wait for (or are in) compute; fetching resumes below.
    max_scheduled_per_partition: int = 8
    # Lifetime of ephemeral sampler snapshots (save_weights_for_sampler with a sampling_session_id, no name).
    ephemeral_ttl_s: int = 86400
    # Activation checkpointing of the decoder layers: less memory, about 30 % more compute.
    gradient_checkpointing: bool = False
    # Bit-identical replays: None = on for CPU (free there), off for GPU (slower deterministic kernels).
    deterministic: bool | None = None
    # Positions per lm_head chunk when computing target logprobs (bounds the [chunk, vocab] fp32 logits).
    logprob_chunk_tokens: int = 1024
    # Padded tokens per micro-batch; longer requests run in two passes (see backends/hf_peft.py).
    micro_batch_tokens: int = 16384
    # Smallest interval between two offset commits of the consumer.
    commit_interval_s: float = 0.1
    backend: str = "hf_peft"  # or "megatron"
    megatron_tp_size: int = 1  # tensor-parallel GPUs of the megatron backend

    @classmethod
    def from_env(cls, **overrides: object) -> TrainerConfig:
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(f"TINKER_BUS_TRAINER_{f.name.upper()}")
            if raw is None:
                continue
            kind = type(getattr(cls, f.name))
            if kind is bool or f.name == "deterministic":
                values[f.name] = raw.lower() in ("1", "true", "yes", "on")
            else:
                values[f.name] = kind(raw)
        return replace(cls(**values), **overrides)  # type: ignore[arg-type]
