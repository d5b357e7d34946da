"""A SIGKILLed gateway restarted while the bus holds many records: every future promised before the kill is
answered by the new process (try_again while its bus listener catches up, never a final 404), and /healthz says
"not ready" meanwhile. The gateway runs as a real subprocess on the real broker and S3 (issue 20, item 1)."""

from __future__ import annotations

import asyncio

import httpx
from gateway_support import API_KEYS, KEY_A, BusProbe, seed_model
from recovery_support import PartProcess
from test_gateway_validation import PROTO, _fb_body

from bus_events import EventType, encode_event, make_event, make_result
from bus_events import payloads as p
from bus_runtime.net import free_port

pytest_plugins = ["gateway_support"]

FILLER = 6000


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
            # Records ahead of the request in its partition, each claim-checked (a listener fetches each payload
            # from S3): a new gateway process needs a while before it reads the request itself.
            other, _ = make_event(EventType.GET_INFO, p.GetInfo(), model_id=model_id, seq_id=0)
            raw = encode_event(*make_result(other, error=p.ErrorInfo(message="filler", category="user")),
                               blob_store=bus.blobs, claim_check_bytes=1)
            sends = [await bus.producer.send(gw_settings.topics.train, raw, key=model_id.encode())
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
