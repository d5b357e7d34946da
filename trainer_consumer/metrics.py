"""The trainer's Prometheus metrics, defined once; the worker calls `submitted` / `finished` / `dead_letter` /
`sample` (a few lines in worker.py) and serves `registry` on its own 127.0.0.1 port (TrainerConfig.metrics_port).

Labels are bounded: `type` and `outcome` by the event contract, `partition` by the train topic's partition count,
`base_model` by the configured base models (bus_runtime.metrics.bounded_label). No model-id labels: per-model
curves are the metrics stream's job (metrics_stream/).

Step time: the engine applies one model's events one after the other, so an event's step time is the time from
when it could start (its submission, or the end of the same model's previous event, whichever is later) to its
reply. With several models it includes waiting for the shared compute thread, which is what a user waits for too.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Collection, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bus_events import EventType, Reply
from bus_runtime.metrics import LATENCY_BUCKETS_S, TOKENS_PER_S_BUCKETS, forward_backward_tokens
from bus_runtime.offsets import OffsetTracker
from trainer_consumer.inbound import Inbound

SAMPLE_INTERVAL_S = 1.0  # gauges are refreshed at most this often (the worker loop turns every ~100 ms)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("tinker_bus_trainer_events_applied", "Training events answered, by type and outcome",
                              ["type", "outcome"], registry=r)
        self.step_seconds = Histogram("tinker_bus_trainer_step_seconds", "Time to apply one event (see module doc)",
                                      ["type"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.tokens = Counter("tinker_bus_trainer_tokens", "Tokens through forward_backward", registry=r)
        self.tokens_per_s = Histogram("tinker_bus_trainer_tokens_per_second", "forward_backward tokens / step time",
                                      buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.queue_depth = Gauge("tinker_bus_trainer_queue_depth_events",
                                 "Events waiting for compute or in it, per train-topic partition", ["partition"],
                                 registry=r)
        self.consumer_lag = Gauge("tinker_bus_trainer_consumer_lag_records",
                                  "Records on the broker not fetched yet (high-watermark - position)", ["partition"],
                                  registry=r)
        self.uncommitted = Gauge("tinker_bus_trainer_uncommitted_records",
                                 "Records fetched but not committed (held for unfinished events or snapshots)",
                                 ["partition"], registry=r)
        self.paused = Gauge("tinker_bus_trainer_partition_paused", "1 while a partition is paused for backpressure",
                            ["partition"], registry=r)
        self.since_commit = Gauge("tinker_bus_trainer_seconds_since_commit", "Seconds since the last offset commit",
                                  registry=r)
        self.models = Gauge("tinker_bus_trainer_models_resident", "Models (adapters) held in memory", registry=r)
        self.gpu_memory = Gauge("tinker_bus_trainer_gpu_memory_bytes", "torch.cuda memory allocated / reserved",
                                ["kind"], registry=r)
        self.dead_letters = Counter("tinker_bus_trainer_dead_letters", "Events sent to the dead-letter topic",
                                    ["stage"], registry=r)
        self._started: weakref.WeakKeyDictionary[Inbound, float] = weakref.WeakKeyDictionary()
        self._model_free_at: dict[str, float] = {}
        self._last_commit = time.monotonic()
        self._last_sample = 0.0

    # ------------------------------------------------------------------ per event
    def submitted(self, inbound: Inbound) -> None:
        self._started[inbound] = time.monotonic()

    def finished(self, inbound: Inbound, replies: list[Reply]) -> None:
        now = time.monotonic()
        model_id = inbound.env.model_id
        start = max(self._started.pop(inbound, now), self._model_free_at.get(model_id, 0.0))
        self._model_free_at[model_id] = now
        if not replies:  # a seq_void: nothing was applied
            return
        kind = inbound.env.type.value
        seconds = now - start
        for _, result in replies:
            self.events.labels(kind, "error" if result.error is not None else "ok").inc()
        self.step_seconds.labels(kind).observe(seconds)
        tokens = forward_backward_tokens(inbound.payload) if inbound.env.type is EventType.FORWARD_BACKWARD else 0
        if tokens:
            self.tokens.inc(tokens)
            if seconds > 0:
                self.tokens_per_s.observe(tokens / seconds)

    def forget_models(self, model_ids: Collection[str]) -> None:
        for model_id in model_ids:
            self._model_free_at.pop(model_id, None)

    def dead_letter(self, stage: str) -> None:
        self.dead_letters.labels(stage).inc()

    def committed(self) -> None:
        self._last_commit = time.monotonic()

    # ------------------------------------------------------------------ gauges, from the worker's loop
    def sample(self, consumer: AIOKafkaConsumer, offsets: OffsetTracker, scheduled: Mapping[tuple[str, int], int],
               models: int) -> None:
        now = time.monotonic()
        if now - self._last_sample < SAMPLE_INTERVAL_S:
            return
        self._last_sample = now
        assignment: set[TopicPartition] = consumer.assignment()
        paused = consumer.paused()
        for gauge in (self.queue_depth, self.consumer_lag, self.uncommitted, self.paused):
            gauge.clear()  # partitions handed to another trainer disappear from this one's export
        for tp in assignment:
            label = str(tp.partition)
            part = offsets.partition(tp)
            received = part.next_offset if part is not None and part.next_offset is not None else None
            committed = part.committed if part is not None and part.committed is not None else 0
            self.queue_depth.labels(label).set(scheduled.get((tp.topic, tp.partition), 0))
            # The fetch high-watermark is right on Tansu (ListOffsets / end_offsets is not: local-infra.md 2.1).
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.consumer_lag.labels(label).set(max(0, highwater - (received or committed)))
            self.uncommitted.labels(label).set(max(0, (received or committed) - committed))
            self.paused.labels(label).set(1 if tp in paused else 0)
        self.since_commit.set(now - self._last_commit)
        self.models.set(models)
        torch = sys.modules.get("torch")  # only if the backend loaded it; never import torch for a metric
        if torch is not None and torch.cuda.is_available():
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved())
