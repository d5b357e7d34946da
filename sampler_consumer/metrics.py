"""The sampler's Prometheus metrics, defined once (the sampler calls these; names carry their units).

Each method's docstring says where the sampler calls it (the README lists the metrics). Labels: `base_model` is
bounded by the configured base models (bus_runtime.metrics.bounded_label), `reason` by the fixed FAILURE_REASONS,
and `cache` by the two cache kinds. No model-, adapter- or request-id labels.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bus_runtime.metrics import LATENCY_BUCKETS_S, TOKENS_PER_S_BUCKETS, bounded_label

FAILURE_REASONS = ("user", "server", "dead_letter")
CACHES = ("prefix", "adapter")


class SamplerMetrics:
    def __init__(self, base_models: Collection[str], registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.base_models = tuple(base_models)
        r = self.registry
        self.requests = Counter("tinker_bus_sampler_requests", "Sample requests finished, by outcome",
                                ["base_model", "outcome"], registry=r)
        self.tokens = Counter("tinker_bus_sampler_generated_tokens", "Tokens generated", ["base_model"], registry=r)
        self.prompt_tokens = Counter("tinker_bus_sampler_prompt_tokens", "Prompt tokens prefilled (cache misses)",
                                     ["base_model"], registry=r)
        self.tokens_per_s = Histogram("tinker_bus_sampler_generated_tokens_per_second",
                                      "Decode throughput of one engine step over all running rows",
                                      ["base_model"], buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.ttft = Histogram("tinker_bus_sampler_time_to_first_token_seconds",
                              "From a sample event's arrival to its first generated token", ["base_model"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.request_seconds = Histogram("tinker_bus_sampler_request_seconds",
                                         "From a sample event's arrival to its reply", ["base_model"],
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.running_rows = Gauge("tinker_bus_sampler_running_rows", "Sequences being decoded now", registry=r)
        self.waiting_rows = Gauge("tinker_bus_sampler_waiting_rows", "Sequences admitted but waiting for KV space",
                                  registry=r)
        self.kv_cache_usage = Gauge("tinker_bus_sampler_kv_cache_usage_ratio",
                                    "Fraction of the KV-cache blocks in use (0..1)", registry=r)
        self.cache_lookups = Counter("tinker_bus_sampler_cache_lookups", "Prefix / adapter cache lookups",
                                     ["cache", "result"], registry=r)
        self.failures = Counter("tinker_bus_sampler_failures", "Sample requests answered with an error",
                                ["reason"], registry=r)
        for cache in CACHES:  # export zeros from the start, so rate() works before the first hit
            for result in ("hit", "miss"):
                self.cache_lookups.labels(cache, result)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.running = self.waiting = 0

    def health(self) -> dict[str, int]:
        """What the sampler's heartbeat carries: the gateway's try_again queue state and the dashboard read it."""
        return {"running_rows": self.running, "waiting_rows": self.waiting}

    def _model(self, base_model: str) -> str:
        return bounded_label(base_model, self.base_models)

    def request_done(self, base_model: str, *, ok: bool, seconds: float) -> None:
        """Once per sample request, when its reply is published."""
        model = self._model(base_model)
        self.requests.labels(model, "ok" if ok else "error").inc()
        self.request_seconds.labels(model).observe(seconds)

    def first_token(self, base_model: str, seconds: float) -> None:
        """Once per request, when its first token is sampled (seconds since the request reached the engine)."""
        self.ttft.labels(self._model(base_model)).observe(seconds)

    def engine_step(self, base_model: str, *, tokens: int, prompt_tokens: int, seconds: float, running: int,
                    waiting: int, kv_blocks_used: int, kv_blocks_total: int) -> None:
        """After each engine step: tokens sampled and prompt tokens prefilled (cache misses), the step's
        throughput and the batch's state."""
        model = self._model(base_model)
        self.tokens.labels(model).inc(tokens)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        if seconds > 0 and tokens > 0:
            self.tokens_per_s.labels(model).observe(tokens / seconds)
        self.running, self.waiting = running, waiting  # the heartbeat reads these (gauges keep no plain value)
        self.running_rows.set(running)
        self.waiting_rows.set(waiting)
        self.kv_cache_usage.set(kv_blocks_used / kv_blocks_total if kv_blocks_total else 0.0)

    def cache_lookup(self, cache: str, hit: bool) -> None:
        """Each prefix-cache or adapter-cache lookup; `cache` is "prefix" or "adapter"."""
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        self.cache_lookups.labels(cache, "hit" if hit else "miss").inc()

    def failure(self, reason: str) -> None:
        """A request answered with an error: reason "user", "server" or "dead_letter"."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"reason must be one of {FAILURE_REASONS}, got {reason!r}")
        self.failures.labels(reason).inc()
