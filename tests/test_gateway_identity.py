"""The JWT exchange (auth/token) with API keys configured: a key buys a signed, expiring token that then works
as the credential; forged, expired, foreign and revoked tokens get 401 marked invalid_token (the SDK's cue to
exchange again and replay); a token cannot buy another. The SDK side of the flow (whoami, every call with the
JWT) runs in test_gateway_sessions_sdk.py."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import replace

import pytest
from gateway_support import API_KEYS, FAST, HEADERS_A, gateway_client

from bus_gateway.tokens import InvalidToken, TokenIssuer

pytest_plugins = ["gateway_support"]

SECRET = "identity-test-secret"
CONFIG = replace(FAST, jwt_secret=SECRET, jwt_ttl_s=600.0)
INVALID = 'Bearer error="invalid_token"'


def claims_of(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def with_claims(token: str, **changes: object) -> str:
    """`token` with its claims rewritten and its signature kept: a forgery."""
    header, _, signature = token.split(".")
    body = base64.urlsafe_b64encode(json.dumps({**claims_of(token), **changes}).encode()).rstrip(b"=").decode()
    return f"{header}.{body}.{signature}"


def test_tokens_verify_only_their_own_signature_and_lifetime():
    issuer = TokenIssuer(SECRET, 600.0)
    token = issuer.mint("alice", now=1000.0)
    assert issuer.verify(token, {"alice"}, now=1001.0) == "alice"
    claims = claims_of(token)
    assert claims["sub"] == "tml:user:alice" and claims["org_id"] == "alice" and claims["exp"] - claims["iat"] == 600
    with pytest.raises(InvalidToken, match="expired"):
        issuer.verify(token, {"alice"}, now=1600.0)
    with pytest.raises(InvalidToken, match="signature"):
        TokenIssuer("another-secret", 600.0).verify(token, {"alice"}, now=1001.0)
    with pytest.raises(InvalidToken, match="signature"):
        issuer.verify(with_claims(token, tenant="bob"), {"alice", "bob"}, now=1001.0)
    with pytest.raises(InvalidToken, match="no API key"):
        issuer.verify(token, {"bob"}, now=1001.0)
    unsigned = ".".join([base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode(),
                         token.split(".")[1], ""])
    with pytest.raises(InvalidToken):
        issuer.verify(unsigned, {"alice"}, now=1001.0)
    with pytest.raises(ValueError, match="at least"):
        TokenIssuer(SECRET, 30.0)  # the SDK would exchange before every call


async def test_key_exchanged_for_a_jwt_that_then_authenticates(gw_settings):
    async with gateway_client(gw_settings, API_KEYS, CONFIG) as client:
        config = await client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}, headers=HEADERS_A)
        assert config.json()["pjwt_auth_enabled"] is True
        exchanged = await client.post("/api/v1/auth/token", json={}, headers=HEADERS_A)
        assert exchanged.status_code == 200
        token = exchanged.json()["jwt"]
        assert token.startswith("eyJ") and claims_of(token)["tenant"] == "alice"
        created = await client.post("/api/v1/create_session", json={}, headers={"X-API-Key": token})
        assert created.status_code == 200
        session_id = created.json()["session_id"]
        # the token is alice's: her session is there, and it is hers only
        assert (await client.get(f"/api/v1/sessions/{session_id}", headers={"X-API-Key": token})).status_code == 200
        bob = (await client.post("/api/v1/auth/token", json={}, headers={"X-API-Key": "tml-bob-key"})).json()["jwt"]
        assert (await client.get(f"/api/v1/sessions/{session_id}", headers={"X-API-Key": bob})).status_code == 404

        # a token does not buy another one: it would never expire
        again = await client.post("/api/v1/auth/token", json={}, headers={"X-API-Key": token})
        assert again.status_code == 401 and "not a token" in again.json()["detail"]

        expired = TokenIssuer(SECRET, 600.0).mint("alice", now=time.time() - 3600)
        forged = with_claims(token, tenant="bob", sub="tml:user:bob")
        foreign = TokenIssuer("not-our-secret", 600.0).mint("alice")
        revoked = TokenIssuer(SECRET, 600.0).mint("mallory")  # a tenant without a key
        for bad, why in ((expired, "expired"), (forged, "signature"), (foreign, "signature"),
                         (revoked, "no API key"), ("eyJnot.a.jwt", "signature")):
            refused = await client.post("/api/v1/create_session", json={}, headers={"X-API-Key": bad})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == INVALID, why
            assert why in refused.json()["detail"]


async def test_development_mode_issues_no_tokens(gw_settings):
    async with gateway_client(gw_settings, None, CONFIG) as client:
        config = await client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"})
        assert config.json()["pjwt_auth_enabled"] is False
        refused = await client.post("/api/v1/auth/token", json={}, headers={"X-API-Key": "tml-any"})
        assert refused.status_code == 400 and "development mode" in refused.json()["detail"]
        token = TokenIssuer(SECRET, 600.0).mint("default")
        assert (await client.post("/api/v1/create_session", json={},
                                  headers={"X-API-Key": token})).status_code == 401
