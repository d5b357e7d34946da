"""The faust-streaming app of `tinker-bus metrics`: two agents (requests, replies) fold the log into MetricsState.

Tansu rules (docs/local-infra.md §3, §7): at-least-once only, short group session, and no state in faust Tables
(their changelog recovery loses state on Tansu). So the state is a plain MetricsState held by the agents, and each
instance is a complete replica that rebuilds it from offset 0: its consumer group is its own (the app id carries
the instance id) and starts at `earliest`. Scaling out adds replicas (the gateway asks any live one); it never
splits the state, so no query has to be merged. A replica's start leaves behind one empty faust leader topic and
one consumer group on the broker (faust creates them per app id).

Duplicates: at-least-once redelivery only happens after a rebalance of a replica's own single-member group; the
join by request_id makes a duplicated pair harmless, a duplicated lone reply adds a point at the same x.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import faust
from prometheus_client import CollectorRegistry, Counter

from bus_events import BlobStore
from bus_runtime.settings import BusSettings
from metrics_stream.config import MetricsStreamConfig
from metrics_stream.ingest import ingest_reply, ingest_request
from metrics_stream.series import MetricsState

log = logging.getLogger(__name__)

Ingest = Callable[[MetricsState, bytes | None, BlobStore | None], Awaitable[bool]]


def make_faust_app(settings: BusSettings, config: MetricsStreamConfig, instance: str, state: MetricsState,
                   blobs: BlobStore | None, registry: CollectorRegistry,
                   loop: asyncio.AbstractEventLoop, datadir: str) -> faust.App:
    records = Counter("tinker_bus_metrics_records", "Records folded into the curves, by topic kind and outcome",
                      ["topic", "outcome"], registry=registry)
    app = faust.App(
        f"{settings.topics.prefix}-metrics-{instance}",
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap.split(",")],
        value_serializer="raw", key_serializer="raw",
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=config.session_timeout_s,
        broker_heartbeat_interval=min(1.0, config.session_timeout_s / 4),
        topic_allow_declare=False,  # the bus's topics exist with their final partition counts (ensure_topics)
        web_enabled=False,  # metrics_stream.web serves the JSON
        store="memory://",
        datadir=datadir,
        loop=loop,
    )
    topics = settings.topics
    requests = app.topic(topics.train, topics.sample, key_type=bytes, value_type=bytes)
    replies = app.topic(topics.replies, key_type=bytes, value_type=bytes)

    async def fold(kind: str, ingest: Ingest, value: bytes) -> None:
        try:
            outcome = "ok" if await ingest(state, value, blobs) else "undecodable"
        except Exception:  # a bug in the view must not stop the agent (faust would not restart it)
            log.exception("metrics: a %s record could not be folded", kind)
            outcome = "failed"
        records.labels(kind, outcome).inc()

    @app.agent(requests)
    async def fold_requests(stream: faust.StreamT) -> None:
        async for value in stream:
            await fold("requests", ingest_request, value)

    @app.agent(replies)
    async def fold_replies(stream: faust.StreamT) -> None:
        async for value in stream:
            await fold("replies", ingest_reply, value)

    return app
