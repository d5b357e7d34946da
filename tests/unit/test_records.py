"""decode_record: one intake for every consumer; poison is classified by stage, claim checks are fetched."""

from __future__ import annotations

import asyncio

from bus_events import EventType, encode_event, make_event
from bus_events import payloads as p
from bus_runtime.records import Decoded, Poisoned, decode_record


class Blobs:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put_blob(self, key: str, data: bytes) -> None:
        self.blobs[key] = data

    def get_blob(self, key: str) -> bytes:
        return self.blobs[key]


def raw(kind: EventType, payload: object, blobs: Blobs | None = None, claim_check_bytes: int = 1 << 20) -> bytes:
    env, body = make_event(kind, payload, model_id="m", seq_id=3)  # type: ignore[arg-type]
    return encode_event(env, body, blob_store=blobs, claim_check_bytes=claim_check_bytes)


def decode(data: bytes, blobs: Blobs | None = None, **kw: object) -> Decoded | Poisoned:
    return asyncio.run(decode_record(data, blobs, {EventType.GET_INFO, EventType.CREATE_MODEL}, **kw))  # type: ignore[arg-type]


def test_a_good_record_decodes_to_its_typed_payload():
    out = decode(raw(EventType.CREATE_MODEL, p.CreateModel(base_model="b")))
    assert isinstance(out, Decoded) and isinstance(out.payload, p.CreateModel) and out.env.seq_id == 3


def test_unreadable_bytes_are_poison_at_decode_without_an_envelope():
    out = decode(b"\xc1 not msgpack")
    assert isinstance(out, Poisoned) and out.stage == "decode" and out.env is None and str(out.error)


def test_a_type_that_does_not_belong_here_is_poison_at_validate_with_its_envelope():
    out = decode(raw(EventType.OPTIM_STEP, p.OptimStep(adam_params=p.AdamParams(learning_rate=1e-3))))
    assert isinstance(out, Poisoned) and out.stage == "validate"
    assert out.env is not None and out.error.model_id == "m" and "optim_step" in str(out.error)


def test_the_readers_own_check_runs_before_the_payload():
    def refuse(env):
        from bus_events import ContractError

        raise ContractError("refused by the reader", env.request_id, env.model_id)

    out = decode(raw(EventType.GET_INFO, p.GetInfo()), check=refuse)
    assert isinstance(out, Poisoned) and out.stage == "validate" and "refused" in str(out.error)


def test_a_claim_checked_payload_is_fetched_and_a_lost_one_is_poison_at_decode():
    blobs = Blobs()
    data = raw(EventType.CREATE_MODEL, p.CreateModel(base_model="b" * 200), blobs, claim_check_bytes=64)
    assert blobs.blobs, "the payload went to the blob store"
    out = decode(data, blobs)
    assert isinstance(out, Decoded) and out.payload.base_model == "b" * 200  # type: ignore[union-attr]
    blobs.blobs.clear()
    lost = decode(data, blobs)
    assert isinstance(lost, Poisoned) and lost.stage == "decode" and "payload unreadable" in str(lost.error)


def test_envelope_only_types_skip_the_payload():
    blobs = Blobs()
    data = raw(EventType.CREATE_MODEL, p.CreateModel(base_model="b" * 200), blobs, claim_check_bytes=64)
    blobs.blobs.clear()  # not needed: the payload is never fetched
    out = decode(data, blobs, envelope_only={EventType.CREATE_MODEL})
    assert isinstance(out, Decoded) and out.payload is None and out.env.type == EventType.CREATE_MODEL
