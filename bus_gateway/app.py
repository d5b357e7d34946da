"""create_app: the Litestar application (Tinker API under /api/v1, the original JSON API, OpenAPI at /schema)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Request, Router
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler, Scope

from bus_gateway import forward_backward_route, json_api, observability, openai_api
from bus_gateway.auth import PUBLIC_PATHS, ApiKeyMiddleware, warn_if_development_mode
from bus_gateway.body_parsing import OffLoopJsonRequest
from bus_gateway.config import GatewayConfig
from bus_gateway.deps import DEPENDENCIES
from bus_gateway.errors import EXCEPTION_HANDLERS, FieldError, NotFound
from bus_gateway.futures import IDEMPOTENCY_KEY
from bus_gateway.gateway import Gateway
from bus_gateway.rejections import void_refused_request
from bus_gateway.tinker_api import (
    checkpoint_sharing,
    checkpoints,
    custom_losses,
    exports,
    external_uploads,
    external_weights,
    futures_api,
    futures_batch,
    identity,
    sampling,
    session_queries,
    session_traces,
    sessions,
    training,
)
from bus_gateway.tokens import warn_if_unshared_secret
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)

ROUTES: list[ControllerRouterHandler] = [
    *sessions.ROUTES, *training.ROUTES, *forward_backward_route.ROUTES, *sampling.ROUTES, *checkpoints.ROUTES,
    *futures_api.ROUTES, *custom_losses.ROUTES, *exports.ROUTES, *json_api.ROUTES, *observability.ROUTES,
    *identity.ROUTES, *futures_batch.ROUTES, *session_queries.ROUTES, *session_traces.ROUTES,
    *external_weights.ROUTES, *checkpoint_sharing.ROUTES, *external_uploads.ROUTES]
# The routes whose bodies carry data (GatewayConfig.max_body_bytes), parsed off the event loop (body_parsing.py);
# every other one gets max_request_bytes.
DATA_ROUTES: list[ControllerRouterHandler] = [
    *forward_backward_route.ROUTES, sampling.asample, json_api.training.fwdbwd, json_api.sampling.sample,
    *external_uploads.UPLOAD_ROUTES]


async def capture_idempotency_key(request: Request) -> None:
    IDEMPOTENCY_KEY.set(request.headers.get("x-idempotency-key"))


async def log_unexpected(exc: Exception, scope: Scope) -> None:
    """A 500 is a bug: keep its traceback (client errors are answered and not logged)."""
    if not isinstance(exc, HTTPException | FieldError | NotFound | RecursionError):
        log.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)


def create_app(settings: BusSettings, api_keys: dict[str, str] | None = None,
               config: GatewayConfig | None = None) -> Litestar:
    """api_keys: key -> tenant; None = development mode (any tml- key, tenant "default")."""
    config = config or GatewayConfig.from_env()
    gateway = Gateway(settings, config, api_keys)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        warn_if_development_mode(api_keys)
        warn_if_unshared_secret(config.jwt_secret, api_keys)
        await gateway.start()
        observability.instrument(app.state, gateway)
        try:
            yield
        finally:
            await gateway.stop()

    return Litestar(
        route_handlers=[*[r for r in ROUTES if r not in DATA_ROUTES],
                        Router("/", route_handlers=DATA_ROUTES, request_max_body_size=config.max_body_bytes,
                               request_class=OffLoopJsonRequest),
                        openai_api.router(config.max_body_bytes)],
        lifespan=[lifespan],
        state=State({"gateway": gateway, "api_keys": api_keys, "tokens": gateway.tokens, "trace_builds": {},
                     **observability.state(gateway.objects)}),
        dependencies=DEPENDENCIES,
        middleware=[observability.metrics_middleware,
                    DefineMiddleware(ApiKeyMiddleware, exclude=[*PUBLIC_PATHS, *observability.PUBLIC_PATHS,
                                                                *session_traces.PUBLIC_PATHS,
                                                                *external_weights.PUBLIC_PATHS,
                                                                *external_uploads.PUBLIC_PATHS])],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        after_exception=[log_unexpected, void_refused_request],
        before_request=capture_idempotency_key,
        request_max_body_size=config.max_request_bytes,
        openapi_config=OpenAPIConfig(
            title="tinker-bus gateway", version="0.1.0",
            description="Tinker API (the official SDK's wire protocol) plus the original JSON API, on Kafka.",
            components=Components(security_schemes={
                "apiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header")}),
            security=[{"apiKey": []}],
        ),
        logging_config=None,  # the host process owns logging (tests, the CLI)
        debug=False,
    )
