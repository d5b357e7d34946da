"""Poisoned events: park them on the dead-letter topic with the reason, answer their future, carry on."""

from __future__ import annotations

import logging
from typing import Protocol

from aiokafka import AIOKafkaProducer

from bus_events import DEFAULT_TENANT, ContractError, EventType, make_error_result, make_event, new_id
from bus_events import payloads as p
from bus_events.payloads import DeadLetterStage
from bus_runtime.kafka_io import publish
from bus_runtime.records import UnverifiedEvent
from bus_runtime.settings import BusSettings

log = logging.getLogger(__name__)


class SourceRecord(Protocol):
    """Where a poisoned event was: a fetched aiokafka ConsumerRecord, or a record handed through a door."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


async def send_to_dead_letter(
    producer: AIOKafkaProducer,
    settings: BusSettings,
    record: SourceRecord,
    reason: str,
    stage: DeadLetterStage,
    request_id: str | None = None,
    model_id: str | None = None,
) -> None:
    """Publish the raw record with its reason; if we know whose request it was, fail its future too."""
    log.warning("dead-lettering %s[%s]@%s (%s): %s", record.topic, record.partition, record.offset, stage, reason)
    # The raw bytes may be big; the dead-letter topic is for inspection, so cap what we keep inline.
    raw = (record.value or b"")[: settings.claim_check_bytes // 2]
    env, payload = make_event(
        EventType.DEAD_LETTER,
        p.DeadLetter(reason=reason, stage=stage, source_topic=record.topic,
                     source_partition=record.partition, source_offset=record.offset, raw=raw),
        model_id=model_id or (record.key or b"").decode(errors="replace") or "unknown",
        request_id=new_id("dlq"),
    )
    await publish(producer, settings.topics.dead_letter, env, payload, claim_check_bytes=settings.claim_check_bytes)
    if request_id is not None:
        # The envelope did not decode far enough to know its tenant.
        failed = make_error_result(request_id, model_id or "unknown", DEFAULT_TENANT,
                                   f"rejected by the bus: {reason or 'undecodable event'}")
        await publish(producer, settings.topics.replies, failed.env, failed.payload,
                      claim_check_bytes=settings.claim_check_bytes, signing_key=settings.reply_signing_key)


async def dead_letter_contract_error(
    producer: AIOKafkaProducer, settings: BusSettings, record: SourceRecord, exc: ContractError,
    stage: DeadLetterStage,
) -> None:
    # An event not proven to be its tenant's must not answer that tenant's request either (a forger could fail a
    # pending future by reusing its request_id).
    request_id = None if isinstance(exc, UnverifiedEvent) else exc.request_id
    await send_to_dead_letter(producer, settings, record, str(exc), stage, request_id, exc.model_id)
