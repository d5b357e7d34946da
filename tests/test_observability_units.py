"""Metric definitions and their /metrics endpoints (real HTTP scrapes), label bounds, and the queue state that
try_again answers carry, from heartbeats of trainers and samplers."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from gateway_support import gateway_client
from metrics_support import scrape

from bus_gateway.observability.queue_state import ACTIVE, PAUSED_CAPACITY, assess, role_of
from bus_runtime.health import WorkerHealth, heartbeating, read_health
from bus_runtime.metrics import OTHER_LABEL, bounded_label, serve_metrics
from sampler_consumer.metrics import SamplerMetrics
from trainer_consumer.metrics import TrainerMetrics

pytest_plugins = ["gateway_support"]


def test_sampler_metrics_served_on_loopback_with_bounded_labels() -> None:
    metrics = SamplerMetrics(["tiny"])
    server = serve_metrics(metrics.registry, 0)
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
        metrics.request_done("tiny", ok=True, seconds=0.5)
        metrics.request_done("someone/else", ok=False, seconds=0.1)
        metrics.first_token("tiny", 0.05)
        metrics.engine_step("tiny", tokens=12, prompt_tokens=30, seconds=0.5, running=3, waiting=2,
                            kv_blocks_used=30, kv_blocks_total=120)
        metrics.engine_step("tiny", tokens=52, prompt_tokens=0, seconds=0.5, running=3, waiting=2,
                            kv_blocks_used=30, kv_blocks_total=120)
        metrics.cache_lookup("prefix", hit=True)
        metrics.cache_lookup("adapter", hit=False)
        metrics.failure("user")
        got = scrape(server.url)
    finally:
        server.close()
    assert got[("tinker_bus_sampler_requests_total", (("base_model", "tiny"), ("outcome", "ok")))] == 1
    assert got[("tinker_bus_sampler_requests_total", (("base_model", OTHER_LABEL), ("outcome", "error")))] == 1
    assert got[("tinker_bus_sampler_prompt_tokens_total", (("base_model", "tiny"),))] == 30
    assert got[("tinker_bus_sampler_time_to_first_token_seconds_count", (("base_model", "tiny"),))] == 1
    assert got[("tinker_bus_sampler_generated_tokens_per_second_sum", (("base_model", "tiny"),))] == 128
    assert got[("tinker_bus_sampler_generated_tokens_total", (("base_model", "tiny"),))] == 64
    assert metrics.health() == {"running_rows": 3, "waiting_rows": 2}
    assert got[("tinker_bus_sampler_running_rows", ())] == 3
    assert got[("tinker_bus_sampler_waiting_rows", ())] == 2
    assert got[("tinker_bus_sampler_kv_cache_usage_ratio", ())] == 0.25
    assert got[("tinker_bus_sampler_cache_lookups_total", (("cache", "prefix"), ("result", "hit")))] == 1
    assert got[("tinker_bus_sampler_cache_lookups_total", (("cache", "prefix"), ("result", "miss")))] == 0
    assert got[("tinker_bus_sampler_failures_total", (("reason", "user"),))] == 1
    with pytest.raises(ValueError, match="reason must be one of"):
        metrics.failure("oops")
    with pytest.raises(ValueError, match="cache must be one of"):
        metrics.cache_lookup("kv", hit=True)


def test_each_part_has_its_own_registry() -> None:
    # two trainers' metrics in one process (tests do this) neither clash nor share values
    first, second = TrainerMetrics(), TrainerMetrics()
    first.dead_letter("decode")
    assert first.registry.get_sample_value("tinker_bus_trainer_dead_letters_total", {"stage": "decode"}) == 1
    assert second.registry.get_sample_value("tinker_bus_trainer_dead_letters_total", {"stage": "decode"}) is None


def test_bounded_label_and_port_validation() -> None:
    assert bounded_label("a", ("a", "b")) == "a"
    assert bounded_label("sess-123:train:0", ("a", "b")) == OTHER_LABEL
    with pytest.raises(ValueError, match="metrics_port"):
        serve_metrics(SamplerMetrics([]).registry, -1)


@pytest.mark.parametrize(("role", "heartbeats", "state", "reason"), [
    ("trainer", [], PAUSED_CAPACITY, "no trainer is running"),
    ("trainer", [("trainer", {"queued": 0, "paused_partitions": []})], ACTIVE, None),
    ("trainer", [("trainer", {"queued": 9, "paused_partitions": []})], ACTIVE, "trainer busy: 9 events queued"),
    ("trainer", [("trainer", {"queued": 16, "paused_partitions": [1, 3]})], PAUSED_CAPACITY,
     "trainer at capacity: 16 events queued for compute, 2 partition(s) paused"),
    ("sampler", [("sampler", {"running_rows": 8, "waiting_rows": 5})], PAUSED_CAPACITY,
     "sampler at capacity: 8 rows running, 5 waiting"),
    ("sampler", [("sampler", {})], ACTIVE, None),
    ("sampler", [("trainer", {})], PAUSED_CAPACITY, "no sampler is running"),
])
def test_queue_state_from_heartbeats(role, heartbeats, state, reason) -> None:
    workers = [WorkerHealth(r, f"{r}-1", time.time(), detail) for r, detail in heartbeats]
    got = assess(role, workers)
    assert got.queue_state == state
    assert (got.queue_state_reason is None) if reason is None else reason in got.queue_state_reason


def test_a_stale_heartbeat_is_no_worker() -> None:
    stale = WorkerHealth("trainer", "trainer-1", time.time() - 60, {"queued": 0})
    assert assess("trainer", [stale]).queue_state == PAUSED_CAPACITY


def test_role_of_request_types() -> None:
    assert role_of("sample") == "sampler"
    assert role_of("forward_backward") == "trainer" and role_of("optim_step") == "trainer"
    assert role_of("create_session") is None


async def test_heartbeat_lists_the_metrics_url(store) -> None:
    async with heartbeating(store, "trainer", lambda: {"queued": 2}, metrics_url="http://127.0.0.1:1/metrics"):
        for _ in range(50):
            found = [w for w in read_health(store) if w.role == "trainer"]
            if found:
                break
            await asyncio.sleep(0.05)
    assert found[0].detail == {"queued": 2, "metrics_url": "http://127.0.0.1:1/metrics"}


async def test_dashboard_page_is_public_and_offline_and_its_data_needs_a_key(gw_settings) -> None:
    async with gateway_client(gw_settings, {"tml-alice": "alice"}) as client:
        page = await client.get("/dashboard")
        assert page.status_code == 200 and "dashboard.js" in page.text
        for asset in ("dashboard.js", "dashboard.css"):
            served = await client.get(f"/dashboard/static/{asset}")
            assert served.status_code == 200
            urls = re.findall(r"https?://[^\s\"'`]+", served.text)  # nothing from a CDN: XML namespaces only
            assert all(u.startswith("http://www.w3.org/") for u in urls), urls
        assert "src=\"http" not in page.text and "href=\"http" not in page.text
        assert (await client.get("/dashboard/api/overview")).status_code == 401
        # no metrics part runs here: the page is told so, nothing fails
        curves = await client.get("/dashboard/api/models/m1", headers={"X-API-Key": "tml-alice"})
        assert curves.status_code == 200 and "no metrics part is running" in curves.json()["metrics_error"]
        overview = (await client.get("/dashboard/api/overview", headers={"X-API-Key": "tml-alice"})).json()
        assert overview["tenant"] == "alice" and overview["models"] == []
        assert overview["queues"]["trainer"]["queue_state"] == PAUSED_CAPACITY
        assert "tinker_bus_gateway_http_requests_total" in (await client.get("/metrics")).text
