"""Shared fixtures: a real Tansu broker and a real S3 server (moto) on free loopback ports."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from artifact_store import ObjectStore
from bus_events import Topics
from bus_runtime.settings import BusSettings, open_object_store
from tinker_bus.infra import TansuBroker

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads TRITON_INTERPRET when a kernel module is defined (sampler_consumer.attention, .lora_kernels), and any
# sampler test may import those before tests/test_sampler_kernels.py runs: without a GPU, interpret from the start.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def broker() -> Iterator[TansuBroker]:
    b = TansuBroker()
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


@pytest.fixture
def settings(broker: TansuBroker, s3_endpoint: str) -> BusSettings:
    """Fresh topics and bucket per test, so tests never see each other's events."""
    unique = uuid.uuid4().hex[:8]
    s = BusSettings(
        kafka_bootstrap=broker.bootstrap,
        s3_endpoint=s3_endpoint,
        s3_access_key="testing",
        s3_secret_key="testing",
        bucket=f"tb-{unique}",
        topics=Topics(prefix=f"t{unique}", train_partitions=4, sample_partitions=2, reply_partitions=2),
        fetch_max_wait_ms=10,
        session_timeout_ms=3000,
    )
    open_object_store(s).ensure_bucket()
    return s


@pytest.fixture
def store(settings: BusSettings) -> ObjectStore:
    return open_object_store(settings)
