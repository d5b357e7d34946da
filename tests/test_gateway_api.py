"""Tinker API routes against the real bus and S3, with the probe answering as the workers would: bootstrap,
sessions, create_model / load_weights ids, asample promises and back-pressure, checkpoint listings."""

from __future__ import annotations

import numpy as np
import torch
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    BusProbe,
    gateway_client,
    retrieve,
    seed_model,
)
from tinker.proto.response_conv import deserialize_sample_response

from artifact_store import Checkpoint, CheckpointStore, Registry, SamplingSession, TinkerPath
from bus_events import EventType, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.settings import open_object_store

pytest_plugins = ["gateway_support"]


async def test_bootstrap_and_session_lifecycle(gw_settings):
    async with gateway_client(gw_settings, API_KEYS) as client:
        config = (await client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}, headers=HEADERS_A))
        # keys configured: the SDK exchanges its key for a JWT (test_gateway_identity.py); pyqwest: issue 13
        assert config.json()["pjwt_auth_enabled"] is True and config.json()["use_pyqwest_transport"] is True
        dynamic = await client.post("/api/v1/client/dynamic_config", json={}, headers=HEADERS_A)
        assert dynamic.json()["sample_cancel_enabled"] is True
        caps = (await client.get("/api/v1/get_server_capabilities", headers=HEADERS_A)).json()
        assert [m["model_name"] for m in caps["supported_models"]] == list(gw_settings.base_models)
        assert caps["supported_models"][0]["max_context_length"] == 1024
        telemetry = await client.post("/api/v1/telemetry", headers=HEADERS_A, json={
            "events": [], "platform": "Linux", "sdk_version": "0.38.0", "session_id": "x", "process_uuid": "y"})
        assert telemetry.json() == {"status": "accepted"}

        created = await client.post("/api/v1/create_session", headers=HEADERS_A, json={
            "tags": ["a"], "user_metadata": {"recipe": "probe"}, "sdk_version": "0.38.0", "type": "create_session"})
        session_id = created.json()["session_id"]
        beat = await client.post("/api/v1/session_heartbeat", headers=HEADERS_A,
                                 json={"session_id": session_id, "type": "session_heartbeat"})
        assert beat.json() == {"type": "session_heartbeat"}
        finish = await client.post(f"/api/v1/sessions/{session_id}/finish", headers=HEADERS_A,
                                   json={"reason": {"type": "success"}, "detail": None})
        assert finish.status_code == 200
        after = await client.post("/api/v1/session_heartbeat", headers=HEADERS_A, json={"session_id": session_id})
        assert after.status_code == 410  # stops the SDK's heartbeat loop
        assert (await client.post("/api/v1/session_heartbeat", headers=HEADERS_A,
                                  json={"session_id": "sess-unknown"})).status_code == 404


async def test_create_model_and_create_via_load_use_session_ids(gw_settings):
    source = seed_model(gw_settings, "alice")
    path = TinkerPath(source, "weights", "step-1")
    CheckpointStore(open_object_store(gw_settings)).save(
        path, Checkpoint({"r": 4}, {"w": torch.zeros(2)}, {}, {"step": 1}), base_model=gw_settings.base_models[0])
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        session_id = (await client.post("/api/v1/create_session", json={}, headers=HEADERS_A)).json()["session_id"]
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": gw_settings.base_models[0],
                "lora_config": {"rank": 8, "seed": 3, "train_unembed": False}, "optimizer_config": {"type": "adamw"},
                "user_metadata": {"renderer_name": "chatml"}, "type": "create_model"}
        created = (await client.post("/api/v1/create_model", json=body, headers=HEADERS_A)).json()
        assert created["model_id"] == f"{session_id}:train:0"
        env, payload = await bus.next_event(EventType.CREATE_MODEL)
        assert (env.model_id, env.seq_id, payload.lora.rank, payload.lora.train_unembed) == (
            created["model_id"], 0, 8, False)
        assert payload.user_metadata == {"renderer_name": "chatml"}
        # The client retries create_model (same session, model_seq_id): the same promise, no second event.
        again = (await client.post("/api/v1/create_model", json=body, headers=HEADERS_A)).json()
        assert again["request_id"] == created["request_id"]
        await bus.reply(env, p.ModelInfo(model_id=env.model_id, base_model=payload.base_model, lora_rank=8,
                                         train_attn=True, train_mlp=True, train_unembed=False))
        assert (await retrieve(client, created["request_id"], HEADERS_A)).json() == {
            "model_id": created["model_id"], "type": "create_model"}

        unserved = await client.post("/api/v1/create_model", headers=HEADERS_A,
                                     json={**body, "model_seq_id": 5, "base_model": "Qwen/Qwen3-8B"})
        assert unserved.status_code == 400 and unserved.json()["field"] == "base_model"

        loaded = (await client.post("/api/v1/load_weights", headers=HEADERS_A, json={
            "session_id": session_id, "model_seq_id": 1, "path": str(path), "optimizer": True,
            "type": "load_weights"})).json()
        env, payload = await bus.next_event(EventType.LOAD_WEIGHTS)
        assert (env.model_id, env.seq_id, payload.path, payload.optimizer) == (
            f"{session_id}:train:1", 0, str(path), True)
        assert payload.base_model == gw_settings.base_models[0]
        assert loaded["model_id"] == f"{session_id}:train:1"
        sampler_path = await client.post("/api/v1/load_weights", headers=HEADERS_A, json={
            "session_id": session_id, "model_seq_id": 2, "path": f"tinker://{source}/sampler_weights/x",
            "optimizer": False})
        assert sampler_path.status_code == 400 and sampler_path.json()["field"] == "path"


async def test_asample_promise_back_pressure_and_proto_result(gw_settings):
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        session_id = (await client.post("/api/v1/create_session", json={}, headers=HEADERS_A)).json()["session_id"]
        sampler = (await client.post("/api/v1/create_sampling_session", headers=HEADERS_A, json={
            "session_id": session_id, "sampling_session_seq_id": 3,
            "base_model": gw_settings.base_models[0]})).json()["sampling_session_id"]
        assert sampler == f"{session_id}:sample:3"
        info = (await client.get(f"/api/v1/samplers/{sampler}", headers=HEADERS_A)).json()
        assert info == {"sampler_id": sampler, "base_model": gw_settings.base_models[0]}

        def sample(seq_id: int):
            return client.post("/api/v1/asample", headers={**HEADERS_A, "X-Tinker-Sampling-Backpressure": "1"}, json={
                "sampling_session_id": sampler, "seq_id": seq_id, "num_samples": 2, "prompt_logprobs": True,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
                "sampling_params": {"max_tokens": 3, "seed": 2**64 - 1, "stop": ["</s>"], "temperature": 0.7,
                                    "top_k": -1, "top_p": 1.0}, "type": "sample"})

        first = (await sample(0)).json()
        assert first["sample_sequence_ids"] == [f"{sampler}:0:0", f"{sampler}:0:1"]
        assert (await sample(0)).json()["request_id"] == first["request_id"]  # retried seq_id: same promise
        env, payload = await bus.next_event(EventType.SAMPLE)
        assert (env.model_id, env.seq_id, payload.num_samples, payload.prompt_logprobs) == (sampler, 0, 2, True)
        assert payload.prompt.numpy().tolist() == [5, 6, 7] and payload.sampling_params.stop == ["</s>"]
        assert 0 <= payload.sampling_params.seed < 2**63

        # FAST allows 8 pending samples: the 9th distinct request is told to back off.
        statuses = [(await sample(seq)).status_code for seq in range(1, 9)]
        assert statuses == [200] * 7 + [429]

        seq = p.SampledSequence(tokens=tensor_from_numpy(np.array([1, 2], dtype="i4")),
                                logprobs=tensor_from_numpy(np.array([-0.5, -0.25], dtype="f4")), stop_reason="stop")
        await bus.reply(env, p.SampleResult(
            sequences=[seq, seq], prompt_logprobs=tensor_from_numpy(np.array([np.nan, -1, -2], dtype="f4"))))
        done = await retrieve(client, first["request_id"], HEADERS_A, proto=True)
        assert done.headers["content-type"] == "application/x-protobuf"
        response = deserialize_sample_response(done.content)
        assert [s.tokens for s in response.sequences] == [[1, 2], [1, 2]]
        assert response.prompt_logprobs == [None, -1.0, -2.0]
        assert (await sample(9)).status_code == 200  # one finished, so there is room again


async def test_checkpoint_listing_hides_ephemeral_saves(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    store = CheckpointStore(open_object_store(gw_settings))
    ckpt = Checkpoint({"r": 4}, {"w": torch.zeros(2)}, {}, {"step": 1})
    base = gw_settings.base_models[0]
    store.save(TinkerPath(model_id, "weights", "step-1"), ckpt, base_model=base, user_metadata={"k": "v"})
    store.save(TinkerPath(model_id, "sampler_weights", "final"), ckpt, base_model=base)
    store.save(TinkerPath(model_id, "sampler_weights", "ephemeral-4"), ckpt, base_model=base, ttl_seconds=60)
    async with gateway_client(gw_settings, API_KEYS) as client:
        listed = (await client.get(f"/api/v1/training_runs/{model_id}/checkpoints", headers=HEADERS_A)).json()
        assert sorted(c["checkpoint_id"] for c in listed["checkpoints"]) == ["sampler_weights/final",
                                                                              "weights/step-1"]
        run = (await client.get(f"/api/v1/training_runs/{model_id}?access_scope=owned", headers=HEADERS_A)).json()
        assert run["model_owner"] == "alice" and run["last_checkpoint"]["checkpoint_id"] == "weights/step-1"
        assert run["last_sampler_checkpoint"]["tinker_path"] == f"tinker://{model_id}/sampler_weights/final"
        runs = (await client.get("/api/v1/training_runs?limit=5&offset=0", headers=HEADERS_A)).json()
        assert runs["cursor"] == {"offset": 0, "limit": 5, "total_count": 1}
        info = (await client.post("/api/v1/weights_info", headers=HEADERS_A,
                                  json={"tinker_path": f"tinker://{model_id}/weights/step-1"})).json()
        assert info["base_model"] == base and info["lora_rank"] == 4 and info["is_lora"] is True
        ttl = await client.put(f"/api/v1/training_runs/{model_id}/checkpoints/weights/step-1/ttl",
                               headers=HEADERS_A, json={"ttl_seconds": 3600})
        assert ttl.status_code == 200
        urls = (await client.get(f"/api/v1/training_runs/{model_id}/checkpoints/weights/step-1/external_weights_urls",
                                 headers=HEADERS_A)).json()
        assert "adapter_model.safetensors" in urls["urls"]
        deleted = await client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/step-1",
                                      headers=HEADERS_A)
        assert deleted.status_code == 200
        again = await client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/step-1",
                                    headers=HEADERS_A)
        assert again.status_code == 404
        mine = (await client.get("/api/v1/checkpoints", headers=HEADERS_A)).json()["checkpoints"]
        assert [c["checkpoint_id"] for c in mine] == ["sampler_weights/final"]


async def test_ephemeral_save_names_the_sampling_session(gw_settings):
    model_id = seed_model(gw_settings, "alice", session_id="sess-eph")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        promise = (await client.post("/api/v1/save_weights_for_sampler", headers=HEADERS_A, json={
            "model_id": model_id, "sampling_session_seq_id": 4, "kind": "snapshot", "seq_id": 7})).json()
        env, payload = await bus.next_event(EventType.SAVE_WEIGHTS_FOR_SAMPLER)
        assert (env.seq_id, payload.sampling_session_id, payload.name) == (7, "sess-eph:sample:4", None)
        Registry(open_object_store(gw_settings)).put_sampling_session(SamplingSession(
            "sess-eph:sample:4", gw_settings.base_models[0], "alice", f"tinker://{model_id}/sampler_weights/eph"))
        await bus.reply(env, p.PathResult(path=f"tinker://{model_id}/sampler_weights/ephemeral-7",
                                          sampling_session_id="sess-eph:sample:4"))
        result = (await retrieve(client, promise["request_id"], HEADERS_A)).json()
        assert result["sampling_session_id"] == "sess-eph:sample:4"
        reserved = await client.post("/api/v1/save_weights", headers=HEADERS_A,
                                     json={"model_id": model_id, "path": "ephemeral-1", "seq_id": 8})
        assert reserved.status_code == 400 and reserved.json()["field"] == "path"
        assert (await bus.next_event(EventType.SEQ_VOID))[0].seq_id == 8
