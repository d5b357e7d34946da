"""Sampler tuning knobs (TINKER_BUS_SAMPLER_* environment variables) and device/dtype resolution."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal

import torch

CacheMode = Literal["auto", "dynamic", "static"]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TINKER_BUS_SAMPLER_{name}", default)


@dataclass(frozen=True)
class SamplerConfig:
    max_batch_rows: int = 64  # sequences decoded together (num_samples counts each sample as a row)
    batch_window_ms: float = 5.0  # how long the worker waits for more requests before starting a batch
    adapter_cache_size: int = 16  # LoRA adapters kept loaded per base model (LRU)
    base_model_cache_size: int = 2  # base models kept loaded (LRU)
    cache_mode: CacheMode = "auto"  # KV cache: "static" on GPU (compiled decode step), "dynamic" on CPU
    compile: bool | None = None  # torch.compile the static decode step; None = on for CUDA
    compile_mode: str = "reduce-overhead"  # torch.compile mode of the decode step; this one replays CUDA graphs
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on CUDA
    prompt_logprob_chunk: int = 256  # prompt positions per lm_head call when computing prompt logprobs

    @classmethod
    def from_env(cls, **overrides: object) -> SamplerConfig:
        compile_env = _env("COMPILE", "auto").lower()
        base = cls(
            max_batch_rows=int(_env("MAX_BATCH_ROWS", str(cls.max_batch_rows))),
            batch_window_ms=float(_env("BATCH_WINDOW_MS", str(cls.batch_window_ms))),
            adapter_cache_size=int(_env("ADAPTER_CACHE_SIZE", str(cls.adapter_cache_size))),
            base_model_cache_size=int(_env("BASE_MODEL_CACHE_SIZE", str(cls.base_model_cache_size))),
            cache_mode=_env("CACHE_MODE", cls.cache_mode),  # type: ignore[arg-type]
            compile=None if compile_env == "auto" else compile_env in ("1", "true", "yes"),
            compile_mode=_env("COMPILE_MODE", cls.compile_mode),
            dtype=_env("DTYPE", cls.dtype),
        )
        return replace(base, **overrides)  # type: ignore[arg-type]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_cache_mode(config: SamplerConfig, device: torch.device) -> tuple[Literal["dynamic", "static"], bool]:
    """(cache mode, compile?) for this device: GPU gets a static cache + compiled decode step."""
    mode = config.cache_mode if config.cache_mode != "auto" else ("static" if device.type == "cuda" else "dynamic")
    compiled = config.compile if config.compile is not None else (mode == "static" and device.type == "cuda")
    if compiled and mode != "static":
        raise ValueError("compile=True needs cache_mode='static' (a dynamic cache changes shape every step)")
    return mode, compiled  # type: ignore[return-value]
