"""From a consumed record to a typed event, the same way in every consumer (trainer, sampler, the gateway's bus
listener): decode the envelope, check its type belongs on this topic, fetch a claim-checked payload off the event
loop, and classify every failure as a ContractError with the dead-letter stage it belongs to.

    decoded = await decode_record(record.value, blobs, {EventType.SAMPLE})
    if isinstance(decoded, Poisoned):
        await dead_letter_contract_error(producer, settings, record, decoded.error, decoded.stage)

A reader that only needs the envelope of some types (the gateway's listener, for requests) names them in
`envelope_only`: their payload is not decoded (and no claim check is fetched for them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from bus_events import BlobStore, ContractError, Envelope, EventType, decode_envelope, decode_payload
from bus_events.signing import SIGNATURE_HEADER, TenantKeys, signature_of, signed_by

Stage = Literal["decode", "validate"]


@dataclass(frozen=True)
class Decoded:
    env: Envelope
    payload: msgspec.Struct | None  # None only for a type in `envelope_only`


@dataclass(frozen=True)
class Poisoned:
    error: ContractError  # carries request_id and model_id when the envelope named them
    stage: Stage  # "decode": unreadable bytes or claim check; "validate": readable but breaks the contract
    env: Envelope | None  # the envelope, when it could be read (to answer or void the request)


class _SignedRecord:
    def __init__(self, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None):
        self.value = value or b""
        self.signature = signature_of(headers)

    def _unverified(self, key: bytes | None) -> str | None:
        """Why the record is not signed with `key` (None: it is)."""
        if key is not None and signed_by(key, self.value, self.signature):
            return None
        return "unsigned" if self.signature is None else "signed with another key"


class SignatureCheck(_SignedRecord):
    """Consumers' side of bus_events.signing: with tenant keys configured, a request must be signed with the key of
    the tenant its envelope names. Build one per record (it needs the raw value and headers) and pass it as
    `decode_record(..., check=...)`; without keys it accepts everything (development mode)."""

    def __init__(self, keys: TenantKeys, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None):
        super().__init__(value, headers)
        self.keys = keys

    def __call__(self, env: Envelope) -> None:
        if not self.keys:
            return
        why = self._unverified(self.keys.get(env.tenant))
        if why is not None:
            raise UnverifiedEvent(f"event claims tenant {env.tenant!r} but is {why} (header {SIGNATURE_HEADER}: "
                                  "HMAC-SHA256 of the record value under the tenant's key)", env.request_id,
                                  env.model_id)


class ReplyCheck(_SignedRecord):
    """The reply reader's side: a result must be signed with the workers' key (BusSettings.reply_key), so whoever
    can write the reply topic still cannot answer a future. Without a key it accepts everything."""

    def __init__(self, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None):
        super().__init__(value, headers)
        self.key = key

    def __call__(self, env: Envelope) -> None:
        if self.key is None or env.type != EventType.RESULT:
            return
        why = self._unverified(self.key)
        if why is not None:
            raise UnverifiedEvent(f"result for {env.request_id!r} (tenant {env.tenant!r}) is {why}, not with the "
                                  f"workers' reply key (header {SIGNATURE_HEADER})", env.request_id, env.model_id)


class UnverifiedEvent(ContractError):
    """Not proven to come from the tenant it names: dead-lettered, and never allowed to affect that tenant's models
    (its seq_id is not voided either)."""


async def decode_record(raw: bytes | None, blobs: BlobStore | None, allowed_types: Collection[EventType], *,
                        envelope_only: Collection[EventType] = (),
                        check: Callable[[Envelope], None] | None = None) -> Decoded | Poisoned:
    """The record's envelope and payload, or why it is poison. `check` may add the reader's own envelope rules
    (raising ContractError) before any payload is fetched."""
    try:
        env = decode_envelope(raw or b"")
    except ContractError as exc:
        return Poisoned(exc, "decode", None)
    try:
        if env.type not in allowed_types:
            allowed = ", ".join(sorted(t.value for t in allowed_types))
            raise ContractError(f"{env.type.value} events do not belong on this topic (it carries: {allowed})",
                                env.request_id, env.model_id)
        if check is not None:
            check(env)
        if env.type in envelope_only:
            return Decoded(env, None)
        if env.payload_ref is not None:  # an S3 read: off the event loop
            payload = await asyncio.to_thread(decode_payload, env, blobs)
        else:
            payload = decode_payload(env)
    except ContractError as exc:
        return Poisoned(exc, "validate", env)
    except Exception as exc:  # the claim check could not be fetched: this event cannot be used
        return Poisoned(ContractError(f"payload unreadable: {exc}", env.request_id, env.model_id), "decode", env)
    return Decoded(env, payload)
