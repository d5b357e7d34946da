"""POST /api/v1/auth/token: the SDK's exchange of its API key for a short-lived JWT (tokens.py says the flow)."""

from __future__ import annotations

import msgspec
from litestar import Request, post
from litestar.exceptions import NotAuthorizedException

from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError


class AuthTokenResponse(msgspec.Struct):
    jwt: str


@post("/api/v1/auth/token", status_code=200, tags=["session"],
      summary="Exchange an API key for a short-lived JWT (when API keys are configured)")
async def auth_token(request: Request, gw: GatewayDep, tenant: TenantDep) -> AuthTokenResponse:
    if gw.api_keys is None:
        raise FieldError("X-API-Key", "this gateway runs without API keys (development mode) and issues no tokens; "
                                      "send the key itself")
    if request.auth != "key":  # a token that could renew itself would never expire
        raise NotAuthorizedException("X-API-Key: /api/v1/auth/token exchanges an API key ('tml-...'), not a token")
    return AuthTokenResponse(jwt=gw.tokens.mint(tenant))


ROUTES = [auth_token]
