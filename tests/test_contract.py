"""The event contract: every event type round-trips through the real broker; claim checks use real S3."""

from __future__ import annotations

import asyncio

import msgpack
import msgspec
import numpy as np
import pytest
import zstandard

from bus_events import (
    PAYLOAD_TYPES,
    RESULT_TYPES,
    UNANSWERED_EVENTS,
    ContractError,
    EventType,
    decode_envelope,
    decode_payload,
    decode_result,
    encode_event,
    event_type_of,
    ids,
    make_error_result,
    make_event,
    make_result,
    payload_bytes,
    tensor_from_numpy,
    token_ids_tensor,
)
from bus_events import payloads as p
from bus_events.envelope import MAX_PAYLOAD_BYTES
from bus_runtime.kafka_io import ensure_topics, make_consumer, make_producer, publish


def _tok(n: int, dtype: str = "int32"):
    return tensor_from_numpy(np.arange(n), dtype=dtype)


SAMPLES: dict[EventType, object] = {
    EventType.CREATE_MODEL: p.CreateModel(base_model="m", lora=p.LoraSpec(rank=4, seed=3, train_unembed=False)),
    EventType.LOAD_WEIGHTS: p.LoadWeights(path="tinker://s:train:0/weights/a", optimizer=True),
    EventType.FORWARD_BACKWARD: p.ForwardBackward(
        data=[p.Datum(tokens=_tok(4), loss_fn_inputs={"target_tokens": _tok(4, "int64"),
                                                      "weights": _tok(4, "float32")})],
        loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7, "note": "x"},
    ),
    EventType.OPTIM_STEP: p.OptimStep(adam_params=p.AdamParams(learning_rate=1e-3, grad_clip_norm=1.0)),
    EventType.SAVE_WEIGHTS: p.SaveWeights(name="step-1", ttl_seconds=60),
    EventType.SAVE_WEIGHTS_FOR_SAMPLER: p.SaveWeightsForSampler(sampling_session_id="s:sample:0"),
    EventType.SAVE_WEIGHTS_EXTERNAL: p.SaveWeightsExternal(name="download", ttl_seconds=3600),
    EventType.GET_INFO: p.GetInfo(),
    EventType.UNLOAD_MODEL: p.UnloadModel(),
    EventType.EXPORT_MODEL: p.ExportModel(path="tinker://m/sampler_weights/final", dtype="bfloat16"),
    EventType.SEQ_VOID: p.SeqVoid(reason="rejected at the gateway"),
    EventType.SAMPLE: p.Sample(sampling_session_id="s:sample:0", prompt=_tok(3), num_samples=2,
                               sampling_params=p.SamplingParams(max_tokens=5, stop=["\n", 7], seed=1)),
    EventType.CANCEL: p.Cancel(request_id="req-abc", reason="client abandoned it"),
    EventType.RESULT: p.Result(request_type="optim_step", result={"metrics": {"grad_norm": 1.5}},
                               started_at=1700000000.5),
    EventType.SAMPLE_DELTA: p.SampleDelta(sequences=[p.SequenceDelta(index=1, start=4, tokens=[9, 8],
                                                                     logprobs=[-0.5, -1.25])]),
    EventType.DEAD_LETTER: p.DeadLetter(reason="bad", stage="decode", source_topic="t", source_partition=0,
                                        source_offset=5, raw=b"\x00\x01"),
}


def test_every_event_type_has_a_sample():
    assert set(SAMPLES) == set(PAYLOAD_TYPES)


async def test_round_trip_every_event_type_through_the_broker(settings):
    await ensure_topics(settings)
    producer = make_producer(settings)
    await producer.start()
    sent = {}
    try:
        for i, (etype, payload) in enumerate(SAMPLES.items()):
            env, pl = make_event(etype, payload, model_id=f"m{i % 3}", seq_id=i)
            sent[env.request_id] = (env, pl)
            await publish(producer, settings.topics.train, env, pl, claim_check_bytes=settings.claim_check_bytes)
    finally:
        await producer.stop()

    consumer = make_consumer(settings, settings.topics.train, group_id="contract-test")
    await consumer.start()
    got = {}
    try:
        async with asyncio.timeout(30):
            while len(got) < len(sent):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        env = decode_envelope(rec.value)
                        assert rec.key == env.model_id.encode()
                        got[env.request_id] = (env, decode_payload(env))
    finally:
        await consumer.stop()
    for request_id, (env, payload) in sent.items():
        got_env, got_payload = got[request_id]
        assert got_payload == payload
        assert (got_env.type, got_env.model_id, got_env.seq_id, got_env.trace_id) == (
            env.type, env.model_id, env.seq_id, env.trace_id)


def test_big_payload_goes_through_the_claim_check(store):
    big = p.ForwardBackward(data=[p.Datum(tokens=_tok(400_000))])
    env, pl = make_event(EventType.FORWARD_BACKWARD, big, model_id="m", seq_id=1)
    raw = encode_event(env, pl, blob_store=store, claim_check_bytes=1 << 20)
    assert len(raw) < 4096
    decoded = decode_envelope(raw)
    assert decoded.payload is None and decoded.payload_ref is not None
    assert store.exists(decoded.payload_ref.key)
    assert decode_payload(decoded, store) == big


def test_a_step_sized_payload_travels_compressed_and_an_incompressible_or_small_one_inline():
    tokens = np.random.default_rng(0).integers(0, 128_256, 8 * 2049).reshape(8, 2049)
    step = p.ForwardBackward(data=[p.Datum(tokens=tensor_from_numpy(row[:-1], "int32"),
                                           loss_fn_inputs={"target_tokens": token_ids_tensor(row[1:]),
                                                           "weights": tensor_from_numpy(np.ones(2048), "float32")})
                                   for row in tokens])
    noise = p.ForwardBackward(data=[p.Datum(tokens=tensor_from_numpy(
        np.frombuffer(np.random.default_rng(1).bytes(64_000), "<i4"), "int32"))])
    small = p.ForwardBackward(data=[p.Datum(tokens=_tok(8))])
    forms = {}
    for name, payload in (("step", step), ("noise", noise), ("small", small)):
        env, body = make_event(EventType.FORWARD_BACKWARD, payload, model_id="m", seq_id=1)
        raw = encode_event(env, body)
        decoded = decode_envelope(raw)
        assert decode_payload(decoded) == payload
        form = "zstd" if decoded.payload_zstd is not None else "inline"
        forms[name] = (form, len(raw) < len(payload_bytes(body)) / 3)
    assert forms == {"step": ("zstd", True), "noise": ("inline", False), "small": ("inline", False)}


def _zstd_envelope(frame: bytes) -> bytes:
    return msgpack.packb({"v": 1, "type": "optim_step", "request_id": "r", "model_id": "m", "payload_zstd": frame})


@pytest.mark.parametrize(("frame", "match"), [
    (zstandard.ZstdCompressor(write_content_size=False).compress(msgpack.packb({})), "declares its size"),
    (zstandard.ZstdCompressor().compress(b"\x00" * (MAX_PAYLOAD_BYTES + 1)), "at most"),  # a bomb: never inflated
    (zstandard.ZstdCompressor().compress(msgpack.packb({"adam_params": {}}))[:-4], "decompress"),
    (b"not zstd at all", "declares its size|decompress"),
])
def test_a_compressed_payload_that_hides_its_size_or_lies_about_it_is_refused(frame, match):
    env = decode_envelope(_zstd_envelope(frame))
    with pytest.raises(ContractError, match=match) as info:
        decode_payload(env)
    assert info.value.request_id == "r"


def test_an_envelope_with_two_payload_forms_is_refused():
    frame = zstandard.ZstdCompressor().compress(msgpack.packb({}))
    raw = msgpack.packb({"v": 1, "type": "optim_step", "request_id": "r", "model_id": "m", "payload": {},
                         "payload_zstd": frame})
    with pytest.raises(ContractError, match="exactly one of payload / payload_ref / payload_zstd"):
        decode_envelope(raw)


def test_claim_check_rejects_a_tampered_blob(store):
    env, pl = make_event(EventType.FORWARD_BACKWARD, p.ForwardBackward(data=[p.Datum(tokens=_tok(300_000))]),
                         model_id="m", seq_id=1)
    decoded = decode_envelope(encode_event(env, pl, blob_store=store, claim_check_bytes=1 << 20))
    store.put_bytes(decoded.payload_ref.key, b"tampered")
    with pytest.raises(ContractError, match="sha256"):
        decode_payload(decoded, store)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xc1not msgpack", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb({"v": 99, "type": "optim_step", "request_id": "r", "model_id": "m", "payload": {}}),
         "unsupported schema version"),
        (msgpack.packb({"v": 1, "type": "optim_step", "model_id": "m", "payload": {}}), "request_id"),
        (msgpack.packb({"v": 1, "type": "warp_drive", "request_id": "r", "model_id": "m", "payload": {}}),
         "type"),
    ],
)
def test_bad_envelopes_are_named(raw, match):
    with pytest.raises(ContractError, match=match):
        decode_envelope(raw)


def test_bad_payload_names_the_field():
    raw = msgpack.packb({"v": 1, "type": "optim_step", "request_id": "r", "model_id": "m",
                         "payload": {"adam_params": {"learning_rate": "fast"}}})
    env = decode_envelope(raw)
    with pytest.raises(ContractError, match=r"learning_rate") as info:
        decode_payload(env)
    assert info.value.request_id == "r"


def test_tensor_size_must_match_shape():
    raw = msgpack.packb({"v": 1, "type": "sample", "request_id": "r", "model_id": "m", "payload": {
        "sampling_session_id": "s", "prompt": {"dtype": "int32", "shape": [4], "data": b"\x00" * 8}}})
    with pytest.raises(ContractError, match="needs 16"):
        decode_payload(decode_envelope(raw))


def test_token_ids_travel_as_int32_when_they_all_fit():
    fits = token_ids_tensor(np.array([0, 7, 2**31 - 1], dtype=np.int64))
    assert fits.dtype == "int32" and fits.numpy().tolist() == [0, 7, 2**31 - 1]
    for far in (2**31, -(2**31) - 1, 2**32 + 7):  # 2**32 + 7 would wrap to the valid id 7
        wide = token_ids_tensor(np.array([1, far], dtype=np.int64))
        assert wide.dtype == "int64" and wide.numpy().tolist() == [1, far]


def test_result_mirrors_its_request():
    env, _ = make_event(EventType.OPTIM_STEP, p.OptimStep(), model_id="m", seq_id=7, tenant="acme")
    res_env, res = make_result(env, error=p.ErrorInfo(message="boom", category="user"))
    assert (res_env.request_id, res_env.model_id, res_env.seq_id, res_env.tenant) == (
        env.request_id, "m", 7, "acme")
    assert res.error.message == "boom" and res.result is None


def test_make_event_gives_an_event_whose_payload_class_names_its_type():
    for event_type, payload in SAMPLES.items():
        event = make_event(event_type, payload, model_id="m")
        assert event.env.type == event_type and event.payload is payload and event_type_of(payload) == event_type
        env, body = event  # still unpacks like the pair it was
        assert env is event.env and body is payload
    assert event_type_of(p.OptimStep) == EventType.OPTIM_STEP
    with pytest.raises(TypeError, match="LoraSpec"):
        event_type_of(p.LoraSpec())


def test_inline_payload_is_the_map_of_its_fields():
    """encode_event packs the payload once; on the wire it is the plain msgpack map of its non-default fields."""
    payload = SAMPLES[EventType.FORWARD_BACKWARD]
    raw = encode_event(*make_event(EventType.FORWARD_BACKWARD, payload, model_id="m", seq_id=2))
    wire = msgpack.unpackb(raw, raw=False)
    assert wire["payload"] == msgspec.to_builtins(payload, builtin_types=(bytes,)) and "payload_ref" not in wire
    assert decode_payload(decode_envelope(raw)) == payload


def test_every_request_type_has_one_result_schema():
    requests = set(EventType) - UNANSWERED_EVENTS - {EventType.RESULT, EventType.SAMPLE_DELTA, EventType.DEAD_LETTER}
    assert set(RESULT_TYPES) == requests
    info = p.ModelInfo(model_id="m", base_model="b", lora_rank=4, train_attn=True, train_mlp=True,
                       train_unembed=False)
    assert decode_result("create_model", msgspec.to_builtins(info)) == info
    assert decode_result(EventType.UNLOAD_MODEL, None) == p.PathResult()
    with pytest.raises(ContractError, match="OptimStepResult"):
        decode_result("optim_step", {"metrics": "no"})
    with pytest.raises(ContractError, match="no result schema"):
        decode_result("seq_void", {})


def test_error_result_for_a_request_known_only_by_its_ids():
    env, res = make_error_result("req-1", "m", "acme", "rejected by the bus: bad msgpack")
    assert (env.type, env.request_id, env.model_id, env.tenant, env.seq_id) == (
        EventType.RESULT, "req-1", "m", "acme", None)
    assert res.request_type == "unknown" and res.result is None
    assert res.error == p.ErrorInfo(message="rejected by the bus: bad msgpack", category="user")


def test_id_formats():
    model_id = ids.model_id_for("sess-1", 3)
    assert model_id == "sess-1:train:3" and ids.session_of_model(model_id) == "sess-1" and ids.is_model_id(model_id)
    assert ids.sampling_session_id_for("sess-1", 0) == "sess-1:sample:0" and not ids.is_model_id("my-model")
