"""ASGI middleware timing every HTTP request by route template and status (outermost, so 401s count too)."""

from __future__ import annotations

import time

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from bus_gateway.observability.metrics import UNMATCHED_ROUTE, GatewayMetrics

METRICS_STATE_KEY = "gateway_metrics"


def metrics_middleware(app: ASGIApp) -> ASGIApp:
    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        metrics: GatewayMetrics = scope["app"].state[METRICS_STATE_KEY]
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, capture)
        except Exception as exc:  # answered outside this middleware (Litestar's exception handlers): 401, 404...
            status = getattr(exc, "status_code", 500)
            raise
        finally:
            route = scope.get("path_template") or UNMATCHED_ROUTE
            metrics.observe_request(scope["method"], route, status,  # type: ignore[typeddict-item]
                                    time.perf_counter() - start)

    return middleware
