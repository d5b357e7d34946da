"""POST /api/v1/forward_backward, which both APIs use: the SDK's protobuf body, or the original server's JSON."""

from __future__ import annotations

from litestar import Request, post

from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.json_api.schemas import JsonPromise
from bus_gateway.json_api.training import json_forward_backward
from bus_gateway.tinker_api.schemas import UntypedFuture
from bus_gateway.tinker_api.training import proto_forward_backward


@post("/api/v1/forward_backward", status_code=200, tags=["training"],
      summary="forward_backward / forward: protobuf ForwardBackwardRequest (optionally zstd), or JSON conversations",
      description="Content-Type application/x-protobuf: the SDK's body (tinker-protocol.md 3.2). "
                  "Content-Type application/json: the original server's JSON (see POST /fwdbwd).")
async def forward_backward(request: Request, gw: GatewayDep, tenant: TenantDep) -> UntypedFuture | JsonPromise:
    if "json" in request.headers.get("content-type", ""):
        return await json_forward_backward(request, gw, tenant)
    return await proto_forward_backward(request, gw, tenant)


ROUTES = [forward_backward]
