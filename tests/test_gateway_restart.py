"""A SIGKILLed gateway restarted while the bus holds many records: every future promised before the kill is
answered by the new process (try_again while its bus listener catches up, never a final 404), and /healthz says
"not ready" meanwhile. The gateway runs as a real subprocess on the real broker and S3 (issue 20, item 1)."""

from __future__ import annotations

import asyncio
import time

import httpx
from aiokafka.partitioner import murmur2
from gateway_support import API_KEYS, KEY_A, BusProbe, gateway_client, retrieve, seed_model
from recovery_support import PartProcess
from test_gateway_validation import PROTO, _fb_body

from bus_events import EventType, encode_event, make_event, make_result
from bus_events import payloads as p
from bus_runtime.net import free_port

pytest_plugins = ["gateway_support"]

FILLER = 6000
OLD_RECORDS = 3000


async def _serving(url: str, gateway: PartProcess) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        for _ in range(600):
            assert gateway.alive(), gateway.log_file.read_text()[-3000:]
            try:
                await client.get("/healthz")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError("the gateway never answered")


async def test_a_restarted_gateway_answers_futures_promised_before_the_kill(gw_settings, tmp_path):
    model_id = seed_model(gw_settings, "alice")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    keys = [arg for key, tenant in API_KEYS.items() for arg in ("--api-key", f"{key}={tenant}")]
    # A short grace: before the fix, "unknown" came as soon as it ran out, whatever the listener had read.
    gateway = PartProcess("gateway", gw_settings, tmp_path / "gateway.log", ["--port", str(port), *keys],
                          unknown_request_grace_s=0.1, long_poll_s=1.0)
    try:
        async with BusProbe(gw_settings) as bus, httpx.AsyncClient(base_url=url, timeout=30) as client:
            # Results ahead of the answer in its reply partition, each claim-checked (a listener fetches each
            # payload from S3): a new gateway process needs a while before it reads the answer itself.
            other, _ = make_event(EventType.GET_INFO, p.GetInfo(), model_id=model_id, seq_id=0)
            raw = encode_event(*make_result(other, error=p.ErrorInfo(message="filler", category="user")),
                               blob_store=bus.blobs, claim_check_bytes=1)
            sends = [await bus.producer.send(gw_settings.topics.replies, raw, key=model_id.encode())
                     for _ in range(FILLER)]
            await asyncio.gather(*sends)
            gateway.start()
            await _serving(url, gateway)
            promised = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 1), headers=PROTO)
            assert promised.status_code == 200, promised.text
            request_id = promised.json()["request_id"]
            request, _ = await bus.next_event(EventType.FORWARD_BACKWARD)
            gateway.kill()
            await bus.reply(request, error=p.ErrorInfo(message="the answer", category="user"))

            gateway.start()
            polls = []  # (the gateway's health just before or None, the answer)
            while True:
                assert gateway.alive(), gateway.log_file.read_text()[-3000:]
                try:  # the first poll as soon as the new process serves: its listener has barely started
                    health = (await client.get("/healthz")).json()["components"]["gateway"] if polls else None
                    polled = await client.post("/api/v1/retrieve_future", json={"request_id": request_id},
                                               headers={"X-API-Key": KEY_A})
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
                    continue
                assert polled.status_code == 200, (polls, polled.text)  # never "unknown request_id" (404)
                polls.append((health, polled.json()))
                if polled.json().get("type") != "try_again":
                    break
            assert polled.json()["error"] == "the answer"
            for health, answer in polls[:-1]:  # while it says try_again it is not ready
                assert health is None or (not health["caught_up"] and not health["healthy"]), (health, answer)
    finally:
        gateway.stop()


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to (aiokafka's default partitioner)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


async def _caught_up(client: httpx.AsyncClient) -> dict:
    async with asyncio.timeout(120):
        while True:
            health = (await client.get("/healthz")).json()["components"]["gateway"]
            if health["caught_up"]:
                return health
            assert not health["healthy"], health  # not ready until caught up
            await asyncio.sleep(0.05)


async def test_a_restarted_gateway_starts_reading_where_the_result_window_begins(gw_settings):
    """The listener's start marks (bus_gateway/listener_marks.py, in S3): a restarted gateway skips the records it
    already knows to be older than the result TTL instead of re-reading the log from offset 0 (Tansu answers
    offsets_for_times with 0 when no record is that new), and still answers futures promised before."""
    model_id = seed_model(gw_settings, "alice")
    old_ms = int((time.time() - gw_settings.result_ttl_s - 7200) * 1000)
    async with BusProbe(gw_settings) as bus:
        # Old records on a reply partition the model's reply never touches, so no newer record there helps
        # Tansu's time lookup.
        replies = gw_settings.topics.replies
        other = 1 - murmur2_partition(model_id.encode(), gw_settings.topics.all()[replies])
        sends = [await bus.producer.send(replies, b"old", partition=other, timestamp_ms=old_ms)
                 for _ in range(OLD_RECORDS)]
        await asyncio.gather(*sends)
        async with gateway_client(gw_settings, API_KEYS) as client:
            first = await _caught_up(client)
            assert first["records_read"] >= OLD_RECORDS  # no marks yet: it read them all
            promised = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 1),
                                         headers={**PROTO, "X-API-Key": KEY_A})
            assert promised.status_code == 200, promised.text
            request, _ = await bus.next_event(EventType.FORWARD_BACKWARD)
        await bus.reply(request, error=p.ErrorInfo(message="the answer", category="user"))  # while it is down
        async with gateway_client(gw_settings, API_KEYS) as client:
            second = await _caught_up(client)
            assert second["records_read"] < OLD_RECORDS // 10, second
            answered = await retrieve(client, promised.json()["request_id"], {"X-API-Key": KEY_A})
            assert answered.json()["error"] == "the answer"
