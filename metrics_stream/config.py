"""The metrics part's own settings, read from TINKER_BUS_METRICS_* variables (bus-wide ones: BusSettings)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bus_runtime.env_config import env_config


@dataclass(frozen=True)
class MetricsStreamConfig:
    # JSON curves and its own /metrics on 127.0.0.1:PORT (0 = any free port; the heartbeat tells the gateway).
    port: int = 0
    # faust's consumer-group session: short, because Tansu makes a join take half of it (local-infra.md §3).
    session_timeout_s: float = 6.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MetricsStreamConfig:
        return env_config(cls, "TINKER_BUS_METRICS_", environ, **overrides)
