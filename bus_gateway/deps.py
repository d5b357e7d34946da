"""Dependencies every route handler may ask for by name: `gw` (the Gateway) and `tenant` (the caller's)."""

from __future__ import annotations

from typing import Annotated

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import PathParameter

from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.schemas import ID_PATTERN


def provide_gateway(state: State) -> Gateway:
    return state.gateway


def provide_tenant(request: Request, gw: Gateway) -> str:
    # `gw` is unused on purpose: depending on it puts the two providers in separate resolution batches of one,
    # which Litestar awaits in line; a batch of two costs an anyio task group per request (~9 % of the gateway's
    # event-loop CPU in a 2,048-call rollout round, py-spy, issue 13).
    del gw
    return request.user  # set by ApiKeyMiddleware


DEPENDENCIES = {
    "gw": Provide(provide_gateway, sync_to_thread=False),
    "tenant": Provide(provide_tenant, sync_to_thread=False),
}

GatewayDep = NamedDependency[Gateway]
# An id in a URL path: the same character set as ids in bodies (anything else cannot name a thing of ours).
PathId = Annotated[str, PathParameter(pattern=ID_PATTERN)]
TenantDep = NamedDependency[str]
