"""Signed, expiring grants to read (GET) or write (PUT) one stored file: the token inside a download or upload URL.

A token names what it grants (the method, the object key, the checkpoint it belongs to, the tenant it was issued
to, the expiry) and carries an HMAC-SHA256 over exactly that. Whoever holds the key can mint and check tokens, so every
gateway of a deployment derives the same key (from the S3 secret they already share). A token grants nothing
by itself: the server that honours it still checks that the tenant may read the checkpoint at that moment, so
unpublishing or deleting revokes URLs already handed out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import asdict, dataclass


class InvalidToken(ValueError):
    pass


class ExpiredToken(InvalidToken):
    pass


@dataclass(frozen=True)
class Grant:
    key: str  # object key of the file (one version of one checkpoint: an overwrite makes the URL go stale)
    tinker_path: str  # the checkpoint the file belongs to, re-checked for readability on every use
    tenant: str
    expires_at: int  # unix seconds
    method: str = "GET"  # GET: download an existing file; PUT: upload a staged file


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def derive_key(secret: str, purpose: str = "tinker-bus signed download urls v1") -> bytes:
    """A signing key of its own for `purpose`, from a secret every server already holds."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


class UrlSigner:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a URL signing key needs at least 16 bytes")
        self._key = key

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def sign(self, grant: Grant) -> str:
        body = _b64(json.dumps(asdict(grant), sort_keys=True, separators=(",", ":")).encode())
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str, method: str, now: float | None = None) -> Grant:
        body, _, mac = token.partition(".")
        if not body or not mac or not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidToken("the URL's signature does not match (altered, or signed by another deployment)")
        try:
            grant = Grant(**json.loads(_unb64(body)))
        except (binascii.Error, ValueError, TypeError) as exc:
            raise InvalidToken(f"the URL's token is malformed: {exc}") from exc
        if grant.method != method:
            raise InvalidToken(f"this URL grants {grant.method}, not {method}")
        if grant.expires_at < (time.time() if now is None else now):
            raise ExpiredToken(f"the URL expired at {grant.expires_at} (unix time); ask for new URLs")
        return grant
