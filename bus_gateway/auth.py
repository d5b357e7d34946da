"""API keys, tenants, and the JWTs the SDK exchanges its key for (tokens.py).

Keys come from `--api-key key=tenant` (repeatable) and/or TINKER_BUS_API_KEYS="key=tenant,key2=tenant2".
The SDK refuses keys without the `tml-` prefix before sending anything, so we refuse to configure them.
No key configured = development mode: any `tml-` key, or no key at all (the original server's JSON API had no
keys, and its documented requests send none), is accepted as tenant "default" (logged loudly). A key that is
presented but malformed is still refused: that is a client mistake worth reporting.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterable

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from bus_events import DEFAULT_TENANT
from bus_gateway.tokens import InvalidToken, TokenIssuer

log = logging.getLogger(__name__)

API_KEYS_ENV = "TINKER_BUS_API_KEYS"
KEY_PREFIX = "tml-"
JWT_PREFIX = "eyJ"  # base64url of '{"': how the SDK tells a JWT credential from an API key
DEV_TENANT = DEFAULT_TENANT
# Paths reachable without a key: liveness and the API description.
PUBLIC_PATHS = ["^/schema", "^/api/v1/healthz$", "^/healthz$"]


def bare_key_tenant(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_api_keys(cli_keys: Iterable[str] = (), env_value: str | None = None) -> dict[str, str] | None:
    """key -> tenant from `key=tenant` entries. A bare `key` is a tenant of its own, named from a hash of the key so
    that the secret never lands in S3 documents or logs. None if there are no keys at all."""
    entries = [*cli_keys, *(env_value or "").split(",")]
    keys: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        key, _, tenant = entry.partition("=")
        key, tenant = key.strip(), tenant.strip() or bare_key_tenant(key.strip())
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"API key {key[:8]!r}... must start with {KEY_PREFIX!r} (the tinker SDK rejects others)")
        if keys.get(key, tenant) != tenant:
            raise ValueError(f"API key {key[:8]!r}... is given for two tenants")
        keys[key] = tenant
    return keys or None


def api_keys_from_env(cli_keys: Iterable[str] = ()) -> dict[str, str] | None:
    return parse_api_keys(cli_keys, os.environ.get(API_KEYS_ENV))


def warn_if_development_mode(api_keys: dict[str, str] | None) -> None:
    if api_keys is None:
        log.warning("!" * 78)
        log.warning("!! tinker-bus gateway in DEVELOPMENT MODE: no API keys configured.")
        log.warning("!! Any 'tml-' key (or none) is accepted and everybody shares tenant %r.", DEV_TENANT)
        log.warning("!! Configure keys with --api-key KEY=TENANT or %s=KEY=TENANT,...", API_KEYS_ENV)
        log.warning("!" * 78)


def tenant_for_key(api_keys: dict[str, str] | None, presented: str | None) -> str | None:
    if api_keys is None and not presented:
        return DEV_TENANT
    if not presented or not presented.startswith(KEY_PREFIX):
        return None
    if api_keys is None:
        return DEV_TENANT
    found = None
    for key, tenant in api_keys.items():  # compare against every key: no early exit to time
        if hmac.compare_digest(key.encode(), presented.encode()):
            found = tenant
    return found


def presented_key(connection: ASGIConnection) -> str | None:
    """The SDK sends X-API-Key; plain HTTP clients of the JSON API may prefer `Authorization: Bearer`."""
    key = connection.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = connection.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token else None


def tenant_for_jwt(tokens: TokenIssuer, api_keys: dict[str, str] | None, presented: str) -> str:
    """The tenant of a JWT from the auth exchange; 401 marked invalid_token (the SDK exchanges its key again and
    replays the request once) when it is not valid."""
    try:
        if api_keys is None:
            raise InvalidToken("this gateway has no API keys, so it issues no tokens")
        return tokens.verify(presented, set(api_keys.values()))
    except InvalidToken as exc:
        raise NotAuthorizedException(f"X-API-Key: invalid token ({exc}); exchange your API key for a new one at "
                                     "/api/v1/auth/token",
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from exc


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Sets `request.user` to the caller's tenant, or answers 401; `request.auth` says how it was proven: "key"
    (an API key, or none in development mode) or "jwt"."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        api_keys = connection.app.state.api_keys
        presented = presented_key(connection)
        if presented is not None and presented.startswith(JWT_PREFIX):
            return AuthenticationResult(user=tenant_for_jwt(connection.app.state.tokens, api_keys, presented),
                                        auth="jwt")
        tenant = tenant_for_key(api_keys, presented)
        if tenant is None:
            raise NotAuthorizedException("missing or invalid API key: send a configured 'tml-...' key in X-API-Key")
        return AuthenticationResult(user=tenant, auth="key")
