"""Gateway-only knobs (the shared ones live in bus_runtime.settings.BusSettings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bus_runtime.env_config import env_config
from bus_runtime.net import is_loopback


@dataclass(frozen=True)
class GatewayConfig:
    # retrieve_future holds a pending request this long before answering try_again: well under the SDK's 45 s
    # read timeout, and long enough that the SDK's instant re-poll does not hot-loop (tinker-protocol.md 2.4).
    long_poll_s: float = 25.0
    # Bodies above this get 413 (after zstd decompression too) on the routes that carry data (forward_backward,
    # fwdbwd, asample, sample; app.DATA_ROUTES). The SDK chunks forward_backward at ~5 MB.
    max_body_bytes: int = 64 << 20
    # ... and above this on every other route (sessions, create_model, optim_step, saves, add_lora...): their
    # bodies are a few hundred bytes, and a 50 MB `tags` list must not be parsed on the event loop, let alone kept.
    max_request_bytes: int = 1 << 20
    # asample answers 429 (the SDK backs off and resends the same seq_id) beyond this many pending samples.
    max_inflight_samples: int = 4096
    # An id this gateway has not seen may still be in flight on the bus from another instance: wait this long
    # for the bus listener before calling it unknown.
    unknown_request_grace_s: float = 2.0
    # true: the SDK posts chunks 2..C of a big forward_backward concurrently and chunk 1 last; the trainer's
    # reorder buffer puts them back in seq_id order. We keep the SDK default on purpose so that path is used.
    parallel_fwdbwd_chunks: bool = True
    # true: the SDK zstd-compresses forward_backward bodies (Content-Encoding: zstd; token ids ~2.8x smaller).
    # None (auto): only for clients on another host. Over loopback moving bytes costs nothing, while compressing
    # cost an 8 x 2048 step's submit 2 ms on the H200 (one at a time 0.927x -> 0.948x of the backend, issue 14).
    compress_fwdbwd: bool | None = None
    # true: the SDK sends its requests through pyqwest (reqwest/hyper) instead of plain httpx (tinker-protocol.md 1.4).
    # The SDK's one event-loop thread is the wall of a 2,048-call rollout round, and pyqwest costs it about half the
    # CPU per call: 1.6x the round's tok/s on the H200 (docs/benchmarks.md, issue 13).
    sdk_pyqwest_transport: bool = True
    # How long cached TrainingRun documents (tenant, base model) are trusted before re-reading S3.
    run_cache_s: float = 30.0
    # Synchronous JSON sampling (/sample, /generate, /api/v1/sample) waits at most this long for the sampler.
    sync_sample_timeout_s: float = 120.0
    # The secret the JWTs of the SDK's auth exchange are signed with (tokens.py); every gateway of a deployment
    # needs the same one. Empty: a random one per process. Only used with API keys configured.
    jwt_secret: str = ""
    # Lifetime of those JWTs (the SDK refreshes at half of it); at least 120 s.
    jwt_ttl_s: float = 3600.0
    # true: the SDK waits for its samples through one long-poll per sampling session (/api/v1/retrieve_futures)
    # instead of one retrieve_future per request. Off by default: one more round trip per sample here.
    sample_use_retrieve_futures: bool = False
    # Where this gateway's reply door listens (bus_runtime/doors.py): trainers hand it their results as soon
    # as the broker acknowledged them, instead of it waiting for its next fetch of the reply topic. An address the
    # trainers reach (a multi-host deployment names this host's); empty: no door, results come by the topic only.
    reply_door_host: str = "127.0.0.1"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewayConfig:
        return env_config(cls, "TINKER_BUS_GATEWAY_", environ, **overrides)

    def compresses_fwdbwd_for(self, client_host: str | None) -> bool:
        """Whether a client at `client_host` (its address as the server sees it) is told to compress."""
        return self.compress_fwdbwd if self.compress_fwdbwd is not None else not is_loopback(client_host)
