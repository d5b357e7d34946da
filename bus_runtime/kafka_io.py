"""aiokafka producers and consumers configured for the rules in local-infra.md §7.

- at-least-once, acks=all, no idempotent producer (Tansu rejects aiokafka's InitProducerId);
- consumers start from committed offsets or `earliest`, never `latest` (ListOffsets(LATEST) is wrong);
- short fetch waits, because the broker does not wake a long poll when data arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from bus_events import BlobStore, Envelope, payload_bytes
from bus_events.envelope import encode_envelope
from bus_events.signing import SIGNATURE_HEADER, TenantKeys, sign, signature_headers
from bus_runtime.doors import UNACKED, BusRecord
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 << 20
_PARTITIONER = DefaultPartitioner()
RETRY_DELAY_S = (0.2, 5.0)  # first and longest pause between retries of a failed publish / fetch
SECURITY_PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


def client_security(settings: BusSettings) -> dict[str, Any]:
    """The authentication arguments of every Kafka client of this part: none for PLAINTEXT, else its SASL user
    (and TLS for SASL_SSL). The broker's ACLs for that principal decide what it may read and write."""
    protocol, mechanism = settings.kafka_security_protocol, settings.kafka_sasl_mechanism
    if protocol not in SECURITY_PROTOCOLS:
        raise ValueError(f"TINKER_BUS_KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of "
                         f"{', '.join(SECURITY_PROTOCOLS)}")
    if protocol == "PLAINTEXT":
        return {}
    if mechanism not in SASL_MECHANISMS:
        raise ValueError(f"TINKER_BUS_KAFKA_SASL_MECHANISM={mechanism!r} is not one of {', '.join(SASL_MECHANISMS)}")
    missing = [name for name, value in (("TINKER_BUS_KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
                                        ("TINKER_BUS_KAFKA_SASL_PASSWORD", settings.kafka_sasl_password)) if not value]
    if missing:
        raise ValueError(f"{' and '.join(missing)} must be set with TINKER_BUS_KAFKA_SECURITY_PROTOCOL={protocol}")
    args: dict[str, Any] = {"security_protocol": protocol, "sasl_mechanism": mechanism,
                            "sasl_plain_username": settings.kafka_sasl_username,
                            "sasl_plain_password": settings.kafka_sasl_password}
    if protocol == "SASL_SSL":
        args["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    return args


async def ensure_topics(settings: BusSettings) -> None:
    """Create every topic with its final partition count; existing topics are left alone."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **client_security(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(name, n, settings.replication_factor)
                   for name, n in settings.topics.all().items() if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def make_producer(settings: BusSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=False,
        # Every request and reply is awaited by someone: send at once. Events queued while a send is in flight
        # still share the next batch, so a burst costs no more requests (a 2 ms linger added 2 ms to each of the
        # two produce hops of every call, issue 14).
        linger_ms=0,
        max_request_size=MAX_REQUEST_BYTES,
        **client_security(settings),
    )


def make_consumer(settings: BusSettings, *topics: str, group_id: str | None) -> AIOKafkaConsumer:
    """A consumer; with `group_id` it commits manually, without one the caller assigns partitions."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(200, settings.session_timeout_ms // 6),
        max_poll_interval_ms=24 * 3600 * 1000,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=32 << 20,
        **client_security(settings),
    )


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    env: Envelope,
    payload: msgspec.Struct,
    *,
    blob_store: BlobStore | None = None,
    claim_check_bytes: int,
    signing_keys: TenantKeys | None = None,
    signing_key: bytes | None = None,
    extra_headers: Sequence[tuple[str, bytes]] = (),
    announce: Callable[[BusRecord], object] | None = None,
) -> BusRecord:
    """Encode (claim-checking big payloads off the event loop) and send keyed by model_id; signed as the
    envelope's tenant when `signing_keys` has its key, or with `signing_key` (a reply: the workers' key)
    (bus_events.signing). Returns the record as it was acknowledged. `announce` is shown the record as it goes to
    the broker (offset UNACKED), when its partition is known before the send (the topic's metadata is)."""
    # Packing stays on the loop: msgspec holds the GIL for the whole call wherever it runs (a thread would spare
    # the loop nothing), and it runs at copy speed (~15 us for an 8 x 2048-token step), while a thread hop is two
    # GIL hand-overs, each waiting up to the 5 ms switch interval while a compute thread runs Python (issue 14).
    # Only a claim check's S3 write goes to a thread.
    body = payload_bytes(payload)
    if blob_store is not None and len(body) > claim_check_bytes:
        raw = await asyncio.to_thread(encode_envelope, env, body, blob_store=blob_store,
                                      claim_check_bytes=claim_check_bytes)
    else:
        raw = encode_envelope(env, body, claim_check_bytes=claim_check_bytes)
    headers = signature_headers(signing_keys, env.tenant, raw) if signing_keys else []
    if signing_key is not None:
        headers = [(SIGNATURE_HEADER, sign(signing_key, raw))]
    headers = [*headers, *extra_headers]
    key = env.model_id.encode()
    partition = partition_of(producer, topic, key) if announce is not None else None
    if announce is not None and partition is not None:
        announce(BusRecord(raw, headers, topic, partition, UNACKED, key))
    sent = await producer.send_and_wait(topic, raw, key=key, headers=headers or None, partition=partition)
    return BusRecord(raw, headers, topic, sent.partition, sent.offset, key)


def partition_of(producer: AIOKafkaProducer, topic: str, key: bytes) -> int | None:
    """The partition aiokafka's default partitioner (make_producer's) gives `key`, from the metadata the producer
    holds (None: none yet, as before the topic's first send). Sending there explicitly then keeps the record where
    it was announced."""
    partitions = sorted(producer.client.cluster.partitions_for_topic(topic) or ())
    return _PARTITIONER(key, partitions, partitions) if partitions else None


async def publish_with_retry(
    producer: AIOKafkaProducer,
    topic: str,
    env: Envelope,
    payload: msgspec.Struct,
    *,
    retry_s: float,
    blob_store: BlobStore | None = None,
    claim_check_bytes: int,
    signing_key: bytes | None = None,
) -> BusRecord:
    """`publish`, retried with backoff while the broker is away (restart, failover) for up to `retry_s`; then the
    last error is raised, and the caller stops without committing (its successor re-reads and answers)."""
    deadline = time.monotonic() + retry_s
    delay = RETRY_DELAY_S[0]
    while True:
        try:
            return await publish(producer, topic, env, payload, blob_store=blob_store,
                                 claim_check_bytes=claim_check_bytes, signing_key=signing_key)
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("publishing %s to %s failed (%s); retrying in %.1f s", env.request_id, topic, exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_DELAY_S[1])
