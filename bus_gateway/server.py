"""Run the gateway under uvicorn on 127.0.0.1 (another interface only where a container entrypoint passes
`host`): in-process as a coroutine (tests) or as its own process (`tinker-bus gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn

from bus_gateway.app import create_app
from bus_gateway.config import GatewayConfig
from bus_runtime.settings import BusSettings

HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def make_server(settings: BusSettings, *, api_keys: dict[str, str] | None, port: int,
                config: GatewayConfig | None = None, log_level: str = "info", host: str = HOST) -> uvicorn.Server:
    """`host` other than 127.0.0.1 only inside a container, whose port mapping is the real boundary."""
    app = create_app(settings, api_keys, config)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_keep_alive=75, access_log=False))


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: several gateway processes bind the same port and the kernel spreads
    new connections over them. One event loop per process is what a 2,048-call rollout round saturates (issue 13);
    any gateway answers any future (its listener reads every reply), so which one a connection lands on is free."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def run_gateway(settings: BusSettings, *, api_keys: dict[str, str] | None = None, port: int = DEFAULT_PORT,
                      config: GatewayConfig | None = None, ready: asyncio.Event | None = None,
                      log_level: str = "info") -> None:
    """Serve until cancelled; `ready` is set once the port accepts requests."""
    server = make_server(settings, api_keys=api_keys, port=port, config=config, log_level=log_level)
    # uvicorn only installs signal handlers in the main thread's own run(); in-process we stop it by flag.
    task = asyncio.create_task(server.serve(), name="gateway-uvicorn")
    try:
        while not server.started:
            if task.done():
                await task  # re-raise why it could not start
                raise RuntimeError(f"gateway on {HOST}:{port} exited during startup")
            await asyncio.sleep(0.02)
        if ready is not None:
            ready.set()
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
