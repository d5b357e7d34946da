"""Trainer-only settings (the bus-wide ones live in bus_runtime.settings.BusSettings).

Read from TINKER_BUS_TRAINER_* environment variables by `TrainerConfig.from_env()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bus_runtime.env_config import env_config

ENV_PREFIX = "TINKER_BUS_TRAINER_"


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
    # torch.compile the HF backend's decoder layers and logprob math: None = on for CUDA unless deterministic
    # (docs/benchmarks.md).
    torch_compile: bool | None = None
    # Bit-identical replays: None = on for CPU (free there), off for GPU (slower deterministic kernels).
    deterministic: bool | None = None
    # Positions per lm_head chunk when computing target logprobs (bounds the [chunk, vocab] fp32 logits).
    logprob_chunk_tokens: int = 1024
    # Padded tokens per micro-batch; longer requests run in two passes (see backends/hf_peft.py).
    micro_batch_tokens: int = 16384
    # Smallest interval between two offset commits of the consumer.
    commit_interval_s: float = 0.1
    # Recovery (docs/recovery.md). A model with unsnapshotted changes is snapshotted at its next clean gradient
    # window once it made this many optimizer steps (0: never by count) or this long after its first change
    # (0: never by time). Offsets are committed only up to what snapshots cover, so these bound the replay after a
    # crash. Create / load / unload are snapshotted at once.
    snapshot_every_steps: int = 10
    snapshot_interval_s: float = 60.0
    # ... but snapshots due by step count keep their writes (capture + upload) to at most this share of the time
    # (durability.py; 0: no bound): a big adapter stepping fast then snapshots every few tens of steps, not 10.
    snapshot_write_share: float = 0.1
    # A model without lasting changes since its snapshot records its progress (a small JSON) at most this often.
    marker_interval_s: float = 1.0
    # Handing partitions over (rebalance, stop): how long to wait for running steps and final snapshots.
    release_timeout_s: float = 30.0
    # How long publishing a reply is retried (broker restart...) before the trainer gives up and stops.
    publish_retry_s: float = 300.0
    # Idle lifecycle (residency.py): offload a model (adapter + AdamW moments, durable in its snapshot) idle this
    # long (0: never), or whose session missed heartbeats this long (0: never), or beyond this many resident
    # models per trainer, least recently used first (0: no bound). Its next event reloads it from the snapshot.
    idle_offload_s: float = 1800.0
    session_expiry_s: float = 300.0
    max_resident_adapters: int = 256
    # Prometheus /metrics on 127.0.0.1:PORT (0 = any free port; /healthz lists the URL).
    metrics_port: int = 0
    # Where this trainer's intake door listens (bus_runtime/doors.py): gateways hand it their requests as soon as
    # the broker acknowledged them, instead of it waiting for its next fetch. An address the gateways reach (a
    # multi-host deployment names this host's; gateways that cannot reach it use the log alone). Empty: off. On the
    # H200 it took a step's hop to the trainer 6.3 -> 4.4 ms and one-at-a-time training 0.927x -> 0.946x of the
    # backend (docs/benchmarks.md, issue 14).
    intake_door_host: str = "127.0.0.1"
    # torch CPU threads (0: torch's default). Bit-identical replay needs the same hardware and thread count.
    torch_threads: int = 0
    backend: str = "hf_peft"  # or "megatron"
    # Tensor-parallel GPUs of the megatron backend (`--tensor-parallel`): one process per GPU, this one is rank 0.
    megatron_tp_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> TrainerConfig:
        return env_config(cls, ENV_PREFIX, environ, **overrides)
