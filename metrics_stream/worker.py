"""Run one metrics replica: the faust app (agents fold the log), its JSON/metrics web server, its heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile

from aiohttp import web
from prometheus_client import CollectorRegistry

from bus_runtime.health import heartbeating, instance_id
from bus_runtime.metrics import LOOPBACK
from bus_runtime.net import free_port
from bus_runtime.settings import BusSettings, open_object_store
from metrics_stream.app import make_faust_app
from metrics_stream.config import MetricsStreamConfig
from metrics_stream.series import MetricsState
from metrics_stream.web import make_web_app

ROLE = "metrics"


async def run_metrics(settings: BusSettings, *, ready: asyncio.Event | None = None,
                      config: MetricsStreamConfig | None = None) -> None:
    """Serve until cancelled. `ready` is set once the web server answers (curves fill in as the log is read)."""
    config = config or MetricsStreamConfig.from_env()
    if config.port < 0:
        raise ValueError(f"TINKER_BUS_METRICS_PORT must be >= 0 (0 = any free port), got {config.port}")
    objects = open_object_store(settings)
    state, registry = MetricsState(), CollectorRegistry()
    instance = instance_id(ROLE)
    # faust keeps an (empty, with the memory store) data folder per app id, by default in the working directory:
    # one per replica start would pile up wherever `up` ran. A temporary one goes with the replica.
    datadir = tempfile.TemporaryDirectory(prefix="tinker-bus-metrics-")
    app = make_faust_app(settings, config, instance.replace(".", "-"), state, objects, registry,
                         asyncio.get_running_loop(), datadir.name)
    runner = web.AppRunner(make_web_app(state, registry), access_log=None)
    await runner.setup()
    port = config.port or free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    url = f"http://{LOOPBACK}:{port}"

    def health() -> dict:
        return {"url": url, "models": len(state.models), "records": state.records}

    try:
        await app.start()
        async with heartbeating(objects, ROLE, health, metrics_url=f"{url}/metrics"):
            if ready is not None:
                ready.set()
            await asyncio.Event().wait()  # until cancelled
    finally:
        with contextlib.suppress(Exception):
            await app.stop()
        await runner.cleanup()
        datadir.cleanup()
