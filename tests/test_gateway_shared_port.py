"""Several gateway processes on one port (`tinker-bus gateway --reuse-port`, what `up --gateways N` runs): both
bind and serve, a future promised through one is answered through the other, and the port keeps answering when one
of them is SIGKILLed. Real subprocesses on the real broker and S3."""

from __future__ import annotations

import asyncio

import httpx
from gateway_support import API_KEYS, KEY_A, BusProbe, seed_model
from recovery_support import PartProcess
from test_gateway_restart import _serving
from test_gateway_validation import PROTO, _fb_body

from bus_events import EventType
from bus_events import payloads as p
from bus_runtime.net import free_port

pytest_plugins = ["gateway_support"]


async def _answer(client: httpx.AsyncClient, request_id: str) -> dict:
    while True:
        polled = await client.post("/api/v1/retrieve_future", json={"request_id": request_id},
                                   headers={"X-API-Key": KEY_A})
        assert polled.status_code == 200, polled.text
        if polled.json().get("type") != "try_again":
            return polled.json()


async def test_two_gateways_share_a_port_and_either_answers(gw_settings, tmp_path):
    model_id = seed_model(gw_settings, "alice")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    keys = [arg for key, tenant in API_KEYS.items() for arg in ("--api-key", f"{key}={tenant}")]
    gateways = [PartProcess("gateway", gw_settings, tmp_path / f"gateway-{i}.log",
                            ["--port", str(port), "--reuse-port", *keys], long_poll_s=1.0) for i in range(2)]
    try:
        async with BusProbe(gw_settings) as bus:
            for gateway in gateways:  # the port answers as soon as the first serves: wait for each one's own start
                gateway.start()
                await _serving(url, gateway)
                while "Application startup complete" not in gateway.log_file.read_text():
                    assert gateway.alive(), gateway.log_file.read_text()[-3000:]
                    await asyncio.sleep(0.1)
            assert all(g.alive() for g in gateways), [g.log_file.read_text()[-2000:] for g in gateways]
            # New connections land on either process; every future is answered whichever one is asked.
            request_ids = []
            for seq_id in range(1, 9):
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    promised = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, seq_id),
                                                 headers=PROTO)
                assert promised.status_code == 200, promised.text
                request_ids.append(promised.json()["request_id"])
                request, _ = await bus.next_event(EventType.FORWARD_BACKWARD)
                await bus.reply(request, error=p.ErrorInfo(message=f"answer {seq_id}", category="user"))
            for seq_id, request_id in enumerate(request_ids, start=1):
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    assert (await _answer(client, request_id))["error"] == f"answer {seq_id}"

            gateways[0].kill()
            assert gateways[1].alive(), gateways[1].log_file.read_text()[-3000:]
            for request_id in request_ids:  # the survivor holds the port alone and still knows every future
                async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                    assert "error" in await _answer(client, request_id)
    finally:
        for gateway in gateways:
            if gateway.alive():
                gateway.stop()
