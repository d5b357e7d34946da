"""Short-lived JWTs for the SDK's auth exchange (`POST /api/v1/auth/token`, SDK 0.38 `lib/_jwt_auth.py`).

With API keys configured, `client/config` says `pjwt_auth_enabled`: the SDK posts `{}` to /api/v1/auth/token
with its `tml-` key in X-API-Key, gets `{"jwt": ...}`, then sends the JWT in X-API-Key on every request and
refreshes it at half its lifetime. A JWT the gateway rejects is answered 401 with
`WWW-Authenticate: Bearer error="invalid_token"`, which makes the SDK exchange its key again and replay once.

Tokens are HS256 (HMAC-SHA256) under the gateway's secret: every gateway of a deployment must share it
(TINKER_BUS_GATEWAY_JWT_SECRET); without one each gateway draws its own and accepts only its own tokens.
Claims: `sub` (the user URN), `org_id`, `email` (what `RestClient.whoami` reads), `tenant`, `iat`, `exp`, `iss`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Container
from typing import Any

log = logging.getLogger(__name__)

ISSUER = "tinker-bus"
HEADER = {"alg": "HS256", "typ": "JWT"}
# The SDK refreshes a token on demand once it has 60 s or less left: a shorter life would mean an exchange per call.
MIN_TTL_S = 120.0


class InvalidToken(ValueError):
    """A JWT that is malformed, forged, expired or names a tenant that no longer has a key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def user_urn(tenant: str) -> str:
    return f"tml:user:{tenant}"


def warn_if_unshared_secret(secret: str, api_keys: dict[str, str] | None) -> None:
    if api_keys is not None and not secret:
        log.warning("no TINKER_BUS_GATEWAY_JWT_SECRET: this gateway signs JWTs with a random secret of its own; "
                    "other gateways (and this one after a restart) will refuse its tokens")


class TokenIssuer:
    def __init__(self, secret: str, ttl_s: float) -> None:
        if ttl_s < MIN_TTL_S:
            raise ValueError(f"jwt_ttl_s must be at least {MIN_TTL_S:g} s (the SDK refreshes 60 s before expiry), "
                             f"got {ttl_s:g}")
        self._key = (secret or secrets.token_hex(32)).encode()
        self.ttl_s = ttl_s

    def sign(self, text: str) -> str:
        """The base64url HMAC-SHA256 of `text` under the secret (JWTs, signed download links)."""
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def signed(self, text: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(text), signature)

    def mint(self, tenant: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        claims = {"iss": ISSUER, "sub": user_urn(tenant), "org_id": tenant, "tenant": tenant, "email": "",
                  "iat": int(now), "exp": int(now + self.ttl_s), "jti": uuid.uuid4().hex}
        signing_input = f"{_b64(json.dumps(HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
        return f"{signing_input}.{self.sign(signing_input)}"

    def verify(self, token: str, tenants: Container[str], now: float | None = None) -> str:
        """The tenant `token` was minted for; InvalidToken unless it is ours, unexpired and its tenant still has
        a key (`tenants`)."""
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("not a JWT (three base64url parts)")
        signing_input = f"{parts[0]}.{parts[1]}"
        if not self.signed(signing_input, parts[2]):
            raise InvalidToken("bad signature")
        try:
            header: dict[str, Any] = json.loads(_unb64(parts[0]))
            claims: dict[str, Any] = json.loads(_unb64(parts[1]))
        except (ValueError, binascii.Error) as exc:
            raise InvalidToken(f"unreadable JWT: {exc}") from exc
        if header.get("alg") != HEADER["alg"] or claims.get("iss") != ISSUER:
            raise InvalidToken("not a token of this server")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= (time.time() if now is None else now):
            raise InvalidToken("expired")
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or tenant not in tenants:
            raise InvalidToken("its tenant has no API key any more")
        return tenant
