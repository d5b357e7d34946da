"""One settings object for every process, read from TINKER_BUS_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from bus_events import DEFAULT_CLAIM_CHECK_BYTES, Topics


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TINKER_BUS_{name}", default)


@dataclass(frozen=True)
class BusSettings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_secure: bool = False
    bucket: str = "tinker-bus"
    topics: Topics = field(default_factory=Topics)
    # Tansu does not wake long-polling fetches, so this bounds bus latency (local-infra.md 2.2).
    fetch_max_wait_ms: int = 20
    session_timeout_ms: int = 6000
    claim_check_bytes: int = DEFAULT_CLAIM_CHECK_BYTES
    result_ttl_s: float = 3600.0
    base_models: tuple[str, ...] = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
    device: str = "auto"
    # Replicas per topic partition: 1 for a single broker, 3 on a 3-broker Kafka (compose/README.md).
    replication_factor: int = 1
    trainer_group: str = "tinker-bus-trainers"
    sampler_group: str = "tinker-bus-samplers"

    @classmethod
    def from_env(cls, **overrides: object) -> BusSettings:
        base = cls(
            kafka_bootstrap=_env("KAFKA_BOOTSTRAP", cls.kafka_bootstrap),
            s3_endpoint=_env("S3_ENDPOINT", cls.s3_endpoint),
            s3_access_key=_env("S3_ACCESS_KEY", cls.s3_access_key),
            s3_secret_key=_env("S3_SECRET_KEY", cls.s3_secret_key),
            s3_secure=_env("S3_SECURE", "false").lower() in ("1", "true", "yes"),
            bucket=_env("BUCKET", cls.bucket),
            topics=Topics(prefix=_env("TOPIC_PREFIX", "tinker-bus")),
            fetch_max_wait_ms=int(_env("FETCH_MAX_WAIT_MS", str(cls.fetch_max_wait_ms))),
            session_timeout_ms=int(_env("SESSION_TIMEOUT_MS", str(cls.session_timeout_ms))),
            claim_check_bytes=int(_env("CLAIM_CHECK_BYTES", str(cls.claim_check_bytes))),
            result_ttl_s=float(_env("RESULT_TTL_S", str(cls.result_ttl_s))),
            base_models=tuple(m for m in _env("BASE_MODELS", ",".join(cls.base_models)).split(",") if m),
            device=_env("DEVICE", cls.device),
            replication_factor=int(_env("REPLICATION_FACTOR", str(cls.replication_factor))),
            trainer_group=_env("TRAINER_GROUP", cls.trainer_group),
            sampler_group=_env("SAMPLER_GROUP", cls.sampler_group),
        )
        return replace(base, **overrides)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The TINKER_BUS_* variables `from_env` rebuilds these settings from (how the launcher configures
        its child processes). Partition counts are not carried: topics are created once, up front."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "topics":
                env["TINKER_BUS_TOPIC_PREFIX"] = value.prefix
            elif isinstance(value, bool):
                env[f"TINKER_BUS_{f.name.upper()}"] = "true" if value else "false"
            elif isinstance(value, tuple):
                env[f"TINKER_BUS_{f.name.upper()}"] = ",".join(value)
            else:
                env[f"TINKER_BUS_{f.name.upper()}"] = str(value)
        return env
