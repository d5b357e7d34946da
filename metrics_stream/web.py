"""The metrics part's HTTP face on 127.0.0.1 (aiohttp, which faust already brings): JSON curves for the gateway's
dashboard, and the part's own Prometheus /metrics. The gateway passes the caller's tenant (it authenticated the
key); this port is loopback-only and never exposed.

    GET /v1/models?tenant=T                  models of T, newest first, with latest values
    GET /v1/models/{model_id}?tenant=T&since=X   a model's curves (points with x > X)
    GET /v1/throughput?tenant=T&window_s=60  tokens / replies / errors per second
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from metrics_stream.series import MetricsState

STATE_KEY = web.AppKey("state", MetricsState)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


def _tenant(request: web.Request) -> str | None:
    return request.query.get("tenant") or None


def _float(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name} must be a number, got {raw!r}") from None


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"models": state.list_models(_tenant(request)), "records": state.records})


async def model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    curves = request.app[STATE_KEY].model(model_id, _tenant(request))
    if curves is None:
        raise web.HTTPNotFound(text=f"model_id {model_id!r}: no events seen for it (for this tenant)")
    return web.json_response(curves.to_json(_float(request, "since", -1.0)))


async def throughput(request: web.Request) -> web.Response:
    window = _float(request, "window_s", 60.0)
    if window <= 0:
        raise web.HTTPBadRequest(text=f"window_s must be > 0, got {window}")
    return web.json_response(request.app[STATE_KEY].throughput(_tenant(request), window))


async def prometheus(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(request.app[REGISTRY_KEY]),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_web_app(state: MetricsState, registry: CollectorRegistry) -> web.Application:
    Gauge("tinker_bus_metrics_models_tracked", "Models with curves in this instance", registry=registry) \
        .set_function(lambda: len(state.models))
    app = web.Application()
    app[STATE_KEY] = state
    app[REGISTRY_KEY] = registry
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id}", model)
    app.router.add_get("/v1/throughput", throughput)
    app.router.add_get("/metrics", prometheus)
    return app
