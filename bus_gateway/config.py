"""Gateway-only knobs (the shared ones live in tinker_bus.settings.BusSettings)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TINKER_BUS_GATEWAY_{name}", default)


@dataclass(frozen=True)
class GatewayConfig:
    # retrieve_future holds a pending request this long before answering try_again: well under the SDK's 45 s
    # read timeout, and long enough that the SDK's instant re-poll does not hot-loop (tinker-protocol.md 2.4).
    long_poll_s: float = 25.0
    # Bodies above this get 413 (after zstd decompression too). The SDK chunks forward_backward at ~5 MB.
    max_body_bytes: int = 64 << 20
    # asample answers 429 (the SDK backs off and resends the same seq_id) beyond this many pending samples.
    max_inflight_samples: int = 4096
    # An id this gateway has not seen may still be in flight on the bus from another instance: wait this long
    # for the bus listener before calling it unknown.
    unknown_request_grace_s: float = 2.0
    # true: the SDK posts chunks 2..C of a big forward_backward concurrently and chunk 1 last; the trainer's
    # reorder buffer puts them back in seq_id order. We keep the SDK default on purpose so that path is used.
    parallel_fwdbwd_chunks: bool = True
    # true: the SDK zstd-compresses forward_backward bodies (Content-Encoding: zstd); >10x smaller on the wire.
    compress_fwdbwd: bool = True
    # How long cached TrainingRun documents (tenant, base model) are trusted before re-reading S3.
    run_cache_s: float = 30.0
    # Synchronous JSON sampling (/sample, /generate, /api/v1/sample) waits at most this long for the sampler.
    sync_sample_timeout_s: float = 120.0

    @classmethod
    def from_env(cls, **overrides: object) -> GatewayConfig:
        base = cls(
            long_poll_s=float(_env("LONG_POLL_S", str(cls.long_poll_s))),
            max_body_bytes=int(_env("MAX_BODY_BYTES", str(cls.max_body_bytes))),
            max_inflight_samples=int(_env("MAX_INFLIGHT_SAMPLES", str(cls.max_inflight_samples))),
            unknown_request_grace_s=float(_env("UNKNOWN_REQUEST_GRACE_S", str(cls.unknown_request_grace_s))),
            parallel_fwdbwd_chunks=_env("PARALLEL_FWDBWD_CHUNKS", "true").lower() in ("1", "true", "yes"),
            compress_fwdbwd=_env("COMPRESS_FWDBWD", "true").lower() in ("1", "true", "yes"),
            run_cache_s=float(_env("RUN_CACHE_S", str(cls.run_cache_s))),
            sync_sample_timeout_s=float(_env("SYNC_SAMPLE_TIMEOUT_S", str(cls.sync_sample_timeout_s))),
        )
        return replace(base, **overrides)  # type: ignore[arg-type]
