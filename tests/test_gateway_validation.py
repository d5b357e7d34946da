"""Bad input is stopped at the gateway with an error naming the field; a rejected seq_id is voided on the bus
(so the trainer does not wait for it); the gateway keeps serving afterwards."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import zstandard
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    BusProbe,
    gateway_client,
    seed_model,
)
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from bus_events import EventType
from bus_events.signing import SIGNATURE_HEADER, signed_by
from bus_gateway.config import GatewayConfig
from bus_gateway.tinker_api.training import INLINE_BODY_BYTES
from bus_runtime.base_models import read_base_model_info

PROTO = {**HEADERS_A, "Content-Type": "application/x-protobuf"}

pytest_plugins = ["gateway_support"]


def _fb_body(model_id: str, seq_id: int, tokens=(1, 2, 3), targets=(2, 3, 4), loss_fn="cross_entropy",
             extra: dict | None = None, config: dict | None = None) -> bytes:
    inputs = {"target_tokens": types.TensorData(data=list(targets), dtype="int64", shape=[len(targets)]),
              "weights": types.TensorData(data=[1.0] * len(targets), dtype="float32", shape=[len(targets)])}
    for name, values in (extra or {}).items():
        inputs[name] = types.TensorData(data=list(values), dtype="float32", shape=[len(values)])
    request = types.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, forward_backward_input=types.ForwardBackwardInput(
            data=[types.Datum(model_input=types.ModelInput.from_ints(list(tokens)), loss_fn_inputs=inputs)],
            loss_fn=loss_fn, loss_fn_config=config))
    return forward_backward_request_to_proto(request).SerializeToString()


async def test_valid_forward_backward_reaches_the_bus_compressed(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        body = zstandard.ZstdCompressor().compress(_fb_body(model_id, 1, extra={"advantages": [1.0, 0.0, -1.0],
                                                                               "logprobs": [-1.0, -1.0, -1.0]},
                                                            loss_fn="ppo", config={"clip_low_threshold": 0.9}))
        resp = await client.post("/api/v1/forward_backward", content=body,
                                 headers={**PROTO, "Content-Encoding": "zstd"})
        assert resp.status_code == 200, resp.text
        env, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        assert (env.request_id, env.seq_id, payload.loss_fn) == (resp.json()["request_id"], 1, "ppo")
        assert payload.loss_fn_config == {"clip_low_threshold": 0.9}
        assert payload.data[0].loss_fn_inputs["advantages"].numpy().tolist() == [1.0, 0.0, -1.0]


async def test_big_and_size_less_bodies_are_read_off_the_loop_and_reach_the_bus(gw_settings):
    """Bodies above INLINE_BODY_BYTES, or zstd frames that do not declare their size, take the worker thread."""
    model_id = seed_model(gw_settings, "alice")
    vocab = read_base_model_info(gw_settings.base_models[0]).vocab_size
    n = INLINE_BODY_BYTES // 16 + 1000  # 16 body bytes a token: over the inline size
    tokens = (np.arange(n) % (vocab - 1)).tolist()
    big = _fb_body(model_id, 1, tokens=tokens, targets=[t + 1 for t in tokens])
    assert len(big) > INLINE_BODY_BYTES
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(_fb_body(model_id, 2))
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        for seq_id, body, encoding in ((1, big, {}), (2, sizeless, {"Content-Encoding": "zstd"})):
            resp = await client.post("/api/v1/forward_backward", content=body, headers={**PROTO, **encoding})
            assert resp.status_code == 200, resp.text
            env, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
            assert env.seq_id == seq_id
        assert payload.data[0].tokens.numpy().tolist() == [1, 2, 3]


@pytest.mark.parametrize(("case", "field", "message"), [
    ("vocab", "data[0].model_input", "outside the model's vocabulary"),
    ("target_vocab", "data[0].loss_fn_inputs.target_tokens", "outside the model's vocabulary"),
    ("nan", "data[0].loss_fn_inputs.advantages", "not a finite number"),
    ("length", "data[0].loss_fn_inputs.target_tokens", "does not match model_input length"),
    ("loss", "loss_fn", "unknown loss_fn"),
    ("missing", "data[0].loss_fn_inputs.advantages", "required by loss_fn"),
    ("config", "loss_fn_config.beta", "unknown key"),
])
async def test_bad_forward_backward_is_rejected_and_its_seq_voided(gw_settings, case, field, message):
    model_id = seed_model(gw_settings, "alice")
    vocab = read_base_model_info(gw_settings.base_models[0]).vocab_size
    bodies = {
        "vocab": lambda: _fb_body(model_id, 5, tokens=(1, vocab, 3)),
        "target_vocab": lambda: _fb_body(model_id, 5, targets=(2, 3, -1)),
        "nan": lambda: _fb_body(model_id, 5, loss_fn="importance_sampling",
                                extra={"advantages": [0.0, float("nan"), 1.0], "logprobs": [-1.0] * 3}),
        "length": lambda: _fb_body(model_id, 5, targets=(2, 3)),
        "loss": lambda: _fb_body(model_id, 5, loss_fn="warp_drive"),
        "missing": lambda: _fb_body(model_id, 5, loss_fn="importance_sampling", extra={"logprobs": [-1.0] * 3}),
        "config": lambda: _fb_body(model_id, 5, config={"beta": 0.5}),
    }
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        resp = await client.post("/api/v1/forward_backward", content=bodies[case](), headers=PROTO)
        assert resp.status_code == 400, resp.text
        assert resp.json()["field"] == field and message in resp.json()["detail"]
        env, payload = await bus.next_event(EventType.SEQ_VOID)
        assert (env.model_id, env.seq_id, env.tenant) == (model_id, 5, "alice")
        assert message in payload.reason and payload.request_type == "forward_backward"
        # Still serving: the next request goes through.
        ok = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 6), headers=PROTO)
        assert ok.status_code == 200
        assert (await bus.next_event(EventType.FORWARD_BACKWARD))[0].seq_id == 6


async def test_malformed_and_oversized_bodies(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    config = GatewayConfig(max_body_bytes=4096, long_poll_s=1.0)
    async with gateway_client(gw_settings, API_KEYS, config) as client:
        garbage = await client.post("/api/v1/forward_backward", content=b"\x0a\xff\xff\xff\xff\x0f", headers=PROTO)
        assert garbage.status_code == 400 and garbage.json()["field"] == "body"
        big = _fb_body(model_id, 1, tokens=list(range(2000)), targets=list(range(1, 2001)))
        too_big = await client.post("/api/v1/forward_backward", content=big, headers=PROTO)
        assert too_big.status_code == 413
        bomb = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
        inflated = await client.post("/api/v1/forward_backward", content=bomb,
                                     headers={**PROTO, "Content-Encoding": "zstd"})
        assert inflated.status_code == 413
        bad_json = await client.post("/api/v1/optim_step", content=b"{not json", headers=HEADERS_A)
        assert bad_json.status_code == 400
        typed = await client.post("/api/v1/optim_step", headers=HEADERS_A,
                                  json={"model_id": model_id, "adam_params": {"learning_rate": "fast"}})
        assert typed.status_code == 400 and "learning_rate" in typed.text
        negative = await client.post("/api/v1/optim_step", headers=HEADERS_A,
                                     json={"model_id": model_id, "seq_id": 2, "adam_params": {"beta1": 1.5}})
        assert negative.status_code == 400 and negative.json()["field"] == "adam_params.beta1"
        assert (await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 3),
                                  headers=PROTO)).status_code == 200


async def test_sample_prompt_outside_vocab_and_unsupported_options(gw_settings):
    async with gateway_client(gw_settings, API_KEYS) as client:
        session = (await client.post("/api/v1/create_session", json={}, headers=HEADERS_A)).json()["session_id"]
        sampler = (await client.post("/api/v1/create_sampling_session", headers=HEADERS_A, json={
            "session_id": session, "sampling_session_seq_id": 0,
            "base_model": gw_settings.base_models[0]})).json()["sampling_session_id"]

        def sample(**overrides):
            body = {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
                    "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 1.0}}
            return client.post("/api/v1/asample", headers=HEADERS_A, json={**body, **overrides})

        vocab = read_base_model_info(gw_settings.base_models[0]).vocab_size
        out = await sample(prompt={"chunks": [{"type": "encoded_text", "tokens": [1, int(np.int64(vocab))]}]})
        assert out.status_code == 400 and out.json()["field"] == "prompt"
        image = await sample(prompt={"chunks": [{"type": "image", "data": "AA==", "format": "png"}]})
        assert image.status_code == 400 and image.json()["field"] == "prompt.chunks[0]"
        topk = await sample(topk_sample_logprobs=vocab + 1)
        assert topk.status_code == 400 and topk.json()["field"] == "topk_sample_logprobs"
        for target, field in (({"data": [1, 2], "dtype": "int64", "shape": [1, 2]}, "target_prompt_logprobs"),
                              ({"data": [1.5, 2], "dtype": "int64", "shape": [2, 1]}, "target_prompt_logprobs.data"),
                              ({"data": [1, 2], "dtype": "float32", "shape": [2, 1]}, "target_prompt_logprobs.dtype"),
                              ({"data": [-1, -1], "dtype": "int64", "shape": [2, 1]}, "target_prompt_logprobs"),
                              ({"data": [4], "dtype": "int64", "shape": [2, 1], "sparse_crow_indices": [0, 1, 3],
                                "sparse_col_indices": [0]}, "target_prompt_logprobs.sparse_csr"),
                              ({"data": [4], "dtype": "int64", "shape": [2, 10**12], "sparse_crow_indices": [0, 1, 1],
                                "sparse_col_indices": [0]}, "target_prompt_logprobs.shape")):
            bad = await sample(target_prompt_logprobs=target)
            assert bad.status_code == 400 and bad.json()["field"] == field, (target, bad.text)
        bad_top_p = await sample(sampling_params={"max_tokens": 4, "temperature": 1.0, "top_k": -1, "top_p": 0.0})
        assert bad_top_p.status_code == 400 and bad_top_p.json()["field"] == "sampling_params.top_p"
        assert (await sample()).status_code == 200


async def test_big_requests_travel_by_claim_check(gw_settings):
    settings = replace(gw_settings, claim_check_bytes=4096)
    model_id = seed_model(settings, "alice")
    tokens = list(range(1, 2001))
    async with BusProbe(settings) as bus, gateway_client(settings, API_KEYS) as client:
        resp = await client.post("/api/v1/forward_backward", headers=PROTO,
                                 content=_fb_body(model_id, 1, tokens=[t % 200 for t in tokens],
                                                  targets=[(t + 1) % 200 for t in tokens]))
        assert resp.status_code == 200, resp.text
        env, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        assert env.payload is None and env.payload_ref is not None and env.payload_ref.size > 4096
        assert payload.data[0].tokens.numel == 2000


DEEP = "[" * 20_000 + "]" * 20_000


def _raw(fields: str) -> bytes:
    """A JSON object written by hand: what json.dumps cannot write (1e999, 20,000 levels)."""
    return ("{" + fields + "}").encode()


async def test_hostile_bodies_get_a_4xx_that_names_the_field(gw_settings):
    """Issue 20 items 3-5 and 7: never a 500, never accepted, always the field."""
    model_id = seed_model(gw_settings, "alice")
    json_headers = {**HEADERS_A, "Content-Type": "application/json"}
    async with gateway_client(gw_settings, API_KEYS) as client:
        for route, body in (("/api/v1/create_session", _raw(f'"tags": [], "user_metadata": {{"a": {DEEP}}}')),
                            ("/add_lora", _raw(f'"model_id": "deep", "user_metadata": {{"a": {DEEP}}}'))):
            deep = await client.post(route, content=body, headers=json_headers)
            assert deep.status_code == 400 and deep.json()["field"] == "body", (route, deep.text)
        escape = await client.post("/api/v1/forward_backward", content=_fb_body("../../x:train:0", 1), headers=PROTO)
        assert escape.status_code == 400 and escape.json()["field"] == "model_id"
        negative = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, -1), headers=PROTO)
        assert negative.status_code == 400 and negative.json()["field"] == "seq_id"
        huge_lr = await client.post("/api/v1/optim_step", headers=json_headers, content=_raw(
            f'"model_id": "{model_id}", "seq_id": 3, "adam_params": {{"learning_rate": 1e999}}'))
        assert huge_lr.status_code == 400 and huge_lr.json()["field"] == "adam_params.learning_rate"
        ppo = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 4, loss_fn="ppo"), headers=PROTO)
        assert ppo.status_code == 400 and "logprobs" in ppo.text and "advantages" in ppo.text
        tags = await client.post("/api/v1/create_session", headers=HEADERS_A, json={"tags": ["t"] * 1000})
        assert tags.status_code == 400 and "tags" in tags.text
        big = await client.post("/api/v1/create_session", headers=HEADERS_A, json={"tags": ["x" * 200] * 10_000})
        assert big.status_code == 413  # 2 MB on a route of small bodies: refused before it is parsed
        assert (await client.post("/api/v1/optim_step", headers=HEADERS_A,
                                  json={"model_id": model_id, "seq_id": 5, "adam_params": {}})).status_code == 200
        jump = await client.post("/api/v1/optim_step", headers=HEADERS_A,
                                 json={"model_id": model_id, "seq_id": 2**62, "adam_params": {}})
        assert jump.status_code == 400 and jump.json()["field"] == "seq_id" and "65536 ahead" in jump.text
        assert (await client.get("/healthz")).status_code == 200
        session = (await client.post("/api/v1/create_session", json={}, headers=HEADERS_A)).json()["session_id"]
        sampler = (await client.post("/api/v1/create_sampling_session", headers=HEADERS_A, json={
            "session_id": session, "sampling_session_seq_id": 0,
            "base_model": gw_settings.base_models[0]})).json()["sampling_session_id"]
        top_k = await client.post("/api/v1/asample", headers=HEADERS_A, json={
            "sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": -7, "top_p": 1.0}})
        assert top_k.status_code == 400 and top_k.json()["field"] == "sampling_params.top_k"


async def test_a_request_refused_before_parsing_still_voids_its_seq_id_at_once(gw_settings):
    """Issue 20 item 6: whenever the gateway can read (model_id, seq_id), the burnt seq_id is voided, whatever part
    of the body failed; never for another tenant's model."""
    model_id = seed_model(gw_settings, "alice")
    bobs = seed_model(gw_settings, "bob")
    json_headers = {**HEADERS_A, "Content-Type": "application/json"}
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        cases = [
            (7, "optim_step", client.post("/api/v1/optim_step", headers=HEADERS_A, json={
                "model_id": model_id, "seq_id": 7, "adam_params": {"learning_rate": "fast"}})),
            (8, "optim_step", client.post("/api/v1/optim_step", headers=json_headers, content=_raw(
                f'"model_id": "{model_id}", "seq_id": 8, "adam_params": {{"learning_rate": 1e999}}'))),
            (9, "save_weights", client.post("/api/v1/save_weights", headers=json_headers, content=_raw(
                f'"model_id": "{model_id}", "seq_id": 9, "user_metadata": {{"a": {DEEP}}}'))),
            (10, "forward_backward", client.post("/api/v1/forward_backward", headers=json_headers, content=_raw(
                f'"model_id": "{model_id}", "seq_id": 10, "data": "not conversations"'))),
            (11, "forward_backward", client.post("/api/v1/forward_backward", headers=PROTO,
                                                 content=_fb_body(model_id, 11, extra={"advantages": [1.0]}))),
        ]
        for seq_id, kind, request in cases:
            resp = await request
            assert resp.status_code == 400, (seq_id, resp.text)
            env, void = await bus.next_event(EventType.SEQ_VOID)
            assert (env.model_id, env.seq_id, env.tenant, void.request_type) == (model_id, seq_id, "alice", kind)
        foreign = await client.post("/api/v1/optim_step", headers=HEADERS_A, json={
            "model_id": bobs, "seq_id": 3, "adam_params": {"learning_rate": "fast"}})
        assert foreign.status_code == 400
        ok = await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 12), headers=PROTO)
        assert ok.status_code == 200
        env, _ = await bus.next_event()  # the next event on the bus is that one: bob's seq_id was left alone
        assert (env.type, env.model_id, env.seq_id) == (EventType.FORWARD_BACKWARD, model_id, 12)


async def test_with_tenant_keys_the_gateway_signs_requests_as_the_callers_tenant(gw_settings):
    """Issue 20 item 8: what the gateway publishes proves its tenant (bus_events/signing.py)."""
    settings = replace(gw_settings, event_keys="alice=alice-secret,bob=bob-secret")
    model_id = seed_model(settings, "alice")
    async with BusProbe(settings) as bus, gateway_client(settings, API_KEYS) as client:
        assert (await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 1),
                                  headers=PROTO)).status_code == 200
        assert (await client.post("/api/v1/forward_backward", content=_fb_body(model_id, 2, loss_fn="warp"),
                                  headers=PROTO)).status_code == 400  # its seq_void is signed too
        records = []
        while len(records) < 2:
            for batch in (await bus.consumer.getmany(timeout_ms=500)).values():
                records.extend(r for r in batch if r.topic == settings.topics.train)
        for record in records:
            signature = dict(record.headers).get(SIGNATURE_HEADER)
            assert signed_by(b"alice-secret", record.value, signature)
            assert not signed_by(b"bob-secret", record.value, signature)
