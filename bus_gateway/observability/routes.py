"""/metrics (Prometheus), /dashboard (the page, public) and /dashboard/api/* (its data, tenant-scoped by the same
API keys as the Tinker API: the page sends the key it was given as X-API-Key).

Curves come from the metrics part (metrics_stream/, `tinker-bus metrics`), found through its heartbeat; the gateway
passes the caller's tenant, so a key only ever sees its own tenant's models.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Annotated, Any

import httpx
from litestar import Request, Response, get
from litestar.exceptions import NotFoundException
from litestar.params import QueryParameter
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.observability.metrics import GatewayMetrics
from bus_gateway.observability.middleware import METRICS_STATE_KEY
from bus_gateway.observability.queue_state import QueueView, assess
from bus_gateway.tinker_api.sessions import health_report
from bus_runtime.health import WorkerHealth

STATIC_DIR = Path(__file__).parent / "static"
QUEUE_VIEW_STATE_KEY = "queue_view"
METRICS_ROLE = "metrics"  # metrics_stream.worker.ROLE: the gateway knows the part only by its heartbeat
STREAM_TIMEOUT_S = 5.0
PUBLIC_PATHS = ["^/metrics$", "^/dashboard$", "^/dashboard/static/"]


def _queue_view(request: Request) -> QueueView:
    return request.app.state[QUEUE_VIEW_STATE_KEY]


def _stream_url(workers: list[WorkerHealth]) -> str | None:
    """Any live metrics replica (each holds every model's curves)."""
    live = [w for w in workers if w.role == METRICS_ROLE and w.alive and w.detail.get("url")]
    return str(max(live, key=lambda w: w.last_seen).detail["url"]) if live else None


async def _ask_stream(workers: list[WorkerHealth], path: str, params: dict[str, Any]) -> tuple[int, Any]:
    url = _stream_url(workers)
    if url is None:
        return 503, {"detail": "no metrics part is running (start `tinker-bus metrics`; `up` starts one)"}
    try:
        async with httpx.AsyncClient(timeout=STREAM_TIMEOUT_S) as client:
            response = await client.get(f"{url}{path}", params=params)
    except httpx.HTTPError as exc:
        return 503, {"detail": f"metrics part at {url} did not answer: {exc}"}
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"detail": response.text or f"HTTP {response.status_code}"}


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def prometheus(request: Request, gw: GatewayDep) -> Response:
    metrics: GatewayMetrics = request.app.state[METRICS_STATE_KEY]
    held = len(gw.futures)
    pending = sum(1 for fut in gw.futures._futures.values() if not fut.done.is_set())
    metrics.futures.labels("pending").set(pending)
    metrics.futures.labels("done").set(held - pending)
    metrics.pending_samples.set(gw.futures.local_pending_samples)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@get("/dashboard", include_in_schema=False, sync_to_thread=False)
def dashboard() -> Response:
    return Response((STATIC_DIR / "dashboard.html").read_bytes(), media_type="text/html; charset=utf-8")


@get("/dashboard/api/overview", tags=["observability"], summary="Services, queues, throughput and models (yours)")
async def overview(request: Request, gw: GatewayDep, tenant: TenantDep) -> dict[str, Any]:
    health, workers = await asyncio.gather(health_report(gw), _queue_view(request).workers())
    queues = {role: dataclasses.asdict(assess(role, workers)) for role in ("trainer", "sampler")}
    for role, queue in queues.items():
        alive = [w.detail for w in workers if w.role == role and w.alive]
        queue["queued"] = sum(int(d.get("queued", 0)) for d in alive)
        queue["waiting_rows"] = sum(int(d.get("waiting_rows", 0)) for d in alive)
        queue["paused_partitions"] = sorted(p for d in alive for p in d.get("paused_partitions", ()))
    metrics_parts = [w.detail for w in workers if w.role == METRICS_ROLE and w.alive]
    health["components"]["metrics"] = {"healthy": bool(metrics_parts), "instances": len(metrics_parts),
                                       "detail": metrics_parts}
    (t_status, throughput), (m_status, models) = await asyncio.gather(
        _ask_stream(workers, "/v1/throughput", {"tenant": tenant}), _ask_stream(workers, "/v1/models",
                                                                                 {"tenant": tenant}))
    return {"tenant": tenant, "health": health, "queues": queues,
            "throughput": throughput if t_status == 200 else None,
            "models": models.get("models", []) if m_status == 200 else [],
            "metrics_error": None if m_status == 200 else models.get("detail")}


@get("/dashboard/api/models/{model_id:str}", tags=["observability"], summary="A model's curves (points after x)")
async def model_curves(request: Request, model_id: PathId, tenant: TenantDep,
                       since: Annotated[float, QueryParameter()] = -1.0) -> Any:
    status, body = await _ask_stream(await _queue_view(request).workers(), f"/v1/models/{model_id}",
                                     {"tenant": tenant, "since": since})
    if status == 404:
        raise NotFoundException(f"model_id {model_id!r}: no curves (unknown model, or not yours)")
    if status == 503:  # no metrics part to ask: no curves yet, as the overview says (not a gateway failure)
        return {"model_id": model_id, "series": {}, "counts": {}, "latest": {}, "metrics_error": body["detail"]}
    if status != 200:
        return Response(body, status_code=502)  # the metrics part failed: a bad gateway, in HTTP's words
    return body


ROUTES: list[ControllerRouterHandler] = [prometheus, dashboard, overview, model_curves,
          create_static_files_router(path="/dashboard/static", directories=[STATIC_DIR], include_in_schema=False)]
