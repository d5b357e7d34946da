"""Sampler tuning knobs (TINKER_BUS_SAMPLER_* environment variables) and device/dtype resolution."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from bus_runtime.env_config import env_config


@dataclass(frozen=True)
class SamplerConfig:
    max_batch_rows: int = 0  # rows (samples) decoding at once; 0 = 256 on CPU, 4096 on CUDA
    max_prefill_tokens: int = 0  # prompt tokens prefilled per engine step (>= one prompt); 0 = 512 CPU, 8192 CUDA
    kv_cache_tokens: int = 0  # KV cache size in positions; 0 = 16384 on CPU, kv_cache_fraction of free GPU memory
    kv_cache_fraction: float = 0.5  # share of the free GPU memory (after the weights) the KV cache may take
    page_size: int = 16  # positions per KV page (the unit of sharing and of the block table)
    adapter_cache_size: int = 16  # LoRA adapter slots per base model (loaded adapters, LRU)
    max_lora_rank: int = 32  # adapters of higher rank are refused; slots are sized for this rank
    base_model_cache_size: int = 2  # base models kept loaded (LRU)
    cuda_graphs: bool | None = None  # capture the decode step per batch bucket; None = on for CUDA
    kernels: bool | None = None  # Triton attention + LoRA kernels; None = on for CUDA (CPU: TRITON_INTERPRET=1)
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    prompt_logprob_chunk: int = 256  # prompt positions per lm_head call when computing prompt logprobs
    intake_batch: int = 512  # Kafka records prepared together (one session / adapter lookup each per batch)
    # How long publishing a reply is retried (broker restart...) before the sampler stops uncommitted (its
    # successor re-reads the request and answers it): the trainer's policy too.
    publish_retry_s: float = 300.0
    # A streamed request (`Sample.stream`) gets a sample_delta with its new tokens this often.
    stream_interval_s: float = 0.05
    metrics_port: int = 0  # Prometheus /metrics on 127.0.0.1:PORT (0: any free port; /healthz lists the URL)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> SamplerConfig:
        return env_config(cls, "TINKER_BUS_SAMPLER_", environ, **overrides)

    def resolved(self, device: torch.device) -> SamplerConfig:
        """The 0 / None / "auto" defaults filled in for `device`."""
        cuda = device.type == "cuda"
        return replace(
            self,
            # CUDA: room for a lone request next to a 2,048-row RL round (graph buckets are powers of two).
            max_batch_rows=self.max_batch_rows or (4096 if cuda else 256),
            max_prefill_tokens=self.max_prefill_tokens or (8192 if cuda else 512),
            cuda_graphs=cuda if self.cuda_graphs is None else (self.cuda_graphs and cuda),
            kernels=cuda if self.kernels is None else self.kernels,
            # The kernels' tiles need a power-of-two rank of at least 16 (tl.dot); slots are sized for it.
            max_lora_rank=(max(16, 1 << (self.max_lora_rank - 1).bit_length())
                           if cuda or self.kernels else self.max_lora_rank),
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
