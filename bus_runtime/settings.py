"""One settings object for every process, read from TINKER_BUS_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from artifact_store.object_store import MinioObjectStore, S3Config
from bus_events import DEFAULT_CLAIM_CHECK_BYTES, Topics
from bus_events.signing import parse_tenant_keys
from bus_runtime.env_config import env_config, env_of

ENV_PREFIX = "TINKER_BUS_"


@dataclass(frozen=True)
class BusSettings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Who this part is on the broker (compose/README.md "Kafka principals and ACLs"): PLAINTEXT for the local Tansu
    # broker, which authenticates no one; SASL_PLAINTEXT / SASL_SSL with the part's own SCRAM (or PLAIN) user,
    # whose ACLs decide which topics it may read and write (bus_runtime.kafka_io.client_security).
    kafka_security_protocol: str = "PLAINTEXT"  # kafka_io.SECURITY_PROTOCOLS
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"  # kafka_io.SASL_MECHANISMS
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = ""
    kafka_ssl_cafile: str = ""  # SASL_SSL: the CA of the brokers' certificates; "" = the system's CAs
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "minioadmin"
    s3_secret_key: str = "minioadmin"
    s3_secure: bool = False
    bucket: str = "tinker-bus"
    topics: Topics = field(default_factory=Topics, metadata={"env": "topic"})  # TINKER_BUS_TOPIC_PREFIX
    # Tansu does not wake long-polling fetches, so this bounds bus latency (local-infra.md 2.2).
    fetch_max_wait_ms: int = 20
    # ... and this while a record is expected soon: a gateway awaiting results, a trainer in use (fetch_pacing.py).
    fetch_busy_wait_ms: int = 2
    session_timeout_ms: int = 6000
    claim_check_bytes: int = DEFAULT_CLAIM_CHECK_BYTES
    result_ttl_s: float = 3600.0
    base_models: tuple[str, ...] = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
    device: str = "auto"
    # Replicas per topic partition: 1 for a single broker, 3 on a 3-broker Kafka (compose/README.md).
    replication_factor: int = 1
    trainer_group: str = "tinker-bus-trainers"
    sampler_group: str = "tinker-bus-samplers"
    # Per-tenant event signing keys, `tenant=secret,...` (bus_events/signing.py, docs/events.md "Event identity").
    # Empty: requests are not signed nor checked (development mode, like a gateway without API keys).
    event_keys: str = ""
    # The workers' key for replies (docs/events.md "Event identity"): trainers and samplers sign every result with
    # it, the gateway drops results not signed with it. Empty: replies are not signed nor checked.
    reply_key: str = ""

    @property
    def tenant_keys(self) -> dict[str, bytes]:
        return parse_tenant_keys(self.event_keys)

    @property
    def reply_signing_key(self) -> bytes | None:
        return self.reply_key.encode() if self.reply_key else None

    @property
    def s3(self) -> S3Config:
        return S3Config(self.s3_endpoint, self.s3_access_key, self.s3_secret_key, self.bucket, self.s3_secure)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BusSettings:
        return env_config(cls, ENV_PREFIX, environ, **overrides)

    def to_env(self) -> dict[str, str]:
        """The TINKER_BUS_* variables `from_env` rebuilds these settings from (how the launcher configures
        its child processes)."""
        return env_of(self, ENV_PREFIX)


def open_object_store(settings: BusSettings) -> MinioObjectStore:
    return MinioObjectStore(settings.s3)
