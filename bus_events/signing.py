"""Who sent an event: every request on the bus may carry an HMAC-SHA256 of its record value under its tenant's
key (docs/events.md "Event identity"), in the Kafka header `tinker-bus-sig` (hex). The gateway signs with the key
of the tenant the API key maps to; a direct producer signs with its own tenant's key. A consumer configured with
keys accepts a request only when the signature matches the key of the tenant its envelope names, so a producer
that can reach the broker cannot act as another tenant.

Replies (`result` events on the reply topic) are signed the same way, under the workers' own key
(TINKER_BUS_REPLY_KEY) instead of a tenant's: only trainers, samplers and the gateway hold it, so a producer that
can write the reply topic cannot answer anyone's future, not even its own tenant's.

The signature covers the record value byte for byte (the envelope and its inline payload, or the claim check's
sha256 of a payload in S3), so no canonical re-encoding is involved: sign exactly the bytes you produce.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

SIGNATURE_HEADER = "tinker-bus-sig"

TenantKeys = Mapping[str, bytes]


def parse_tenant_keys(spec: str) -> dict[str, bytes]:
    """`tenant=secret,tenant2=secret2` (TINKER_BUS_EVENT_KEYS) -> {tenant: key}. Empty: signing is off."""
    keys: dict[str, bytes] = {}
    for entry in spec.split(","):
        if not entry.strip():
            continue
        tenant, sep, secret = entry.strip().partition("=")
        if not sep or not tenant.strip() or not secret.strip():
            raise ValueError(f"event key entry {tenant.strip()[:40]!r}... is not tenant=secret")
        keys[tenant.strip()] = secret.strip().encode()
    return keys


def sign(key: bytes, value: bytes) -> bytes:
    """The header value: hex HMAC-SHA256 of the record value."""
    return hmac.new(key, value, hashlib.sha256).hexdigest().encode()


def signature_of(headers: Iterable[tuple[str, bytes]] | None) -> bytes | None:
    """The record's signature header, if it has one."""
    return next((v for k, v in headers or () if k == SIGNATURE_HEADER), None)


def signed_by(key: bytes, value: bytes, signature: bytes | None) -> bool:
    return signature is not None and hmac.compare_digest(sign(key, value), signature)


def signature_headers(keys: TenantKeys, tenant: str, value: bytes) -> list[tuple[str, bytes]]:
    """The record headers that prove `tenant` produced `value` (none when no key is configured for it)."""
    key = keys.get(tenant)
    return [(SIGNATURE_HEADER, sign(key, value))] if key is not None else []
