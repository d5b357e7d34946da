"""API keys and tenants: 401 without a valid key; tenants never see each other's sessions, models, sampling
sessions, checkpoints or futures (404); development mode accepts any tml- key, or none, as tenant "default"."""

from __future__ import annotations

import logging

import pytest
import torch
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    HEADERS_B,
    gateway_client,
    seed_model,
)

from artifact_store import Checkpoint, CheckpointStore, TinkerPath
from bus_gateway.auth import bare_key_tenant, parse_api_keys
from bus_runtime.settings import open_object_store

pytest_plugins = ["gateway_support"]


def test_api_keys_from_flags_and_environment():
    keys = parse_api_keys(["tml-a=acme"], "tml-b=beta, tml-c")
    assert keys == {"tml-a": "acme", "tml-b": "beta", "tml-c": bare_key_tenant("tml-c")}
    assert bare_key_tenant("tml-c") != bare_key_tenant("tml-d")  # two bare keys never share a tenant
    assert parse_api_keys([], "") is None
    with pytest.raises(ValueError, match="tml-"):
        parse_api_keys(["sk-abc=acme"])
    with pytest.raises(ValueError, match="two tenants"):
        parse_api_keys(["tml-a=x", "tml-a=y"])


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "tml-nope"}, {"X-API-Key": "sk-alice"},
                                     {"Authorization": "Bearer tml-wrong"}])
async def test_requests_without_a_valid_key_get_401(gw_settings, headers):
    async with gateway_client(gw_settings, API_KEYS) as client:
        resp = await client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"},
                                 headers=headers)
        assert resp.status_code == 401 and "API key" in resp.json()["detail"]
        # Liveness and the API description stay public.
        assert (await client.get("/api/v1/healthz")).status_code == 200
        assert (await client.get("/schema/openapi.json")).status_code == 200


async def test_bearer_token_works_for_plain_http_clients(gw_settings):
    async with gateway_client(gw_settings, API_KEYS) as client:
        resp = await client.post("/api/v1/create_session", json={}, headers={"Authorization": "Bearer tml-bob-key"})
        assert resp.status_code == 200


async def test_tenants_cannot_see_each_others_things(gw_settings):
    model_a = seed_model(gw_settings, "alice")
    path = TinkerPath(model_a, "weights", "step-1")
    CheckpointStore(open_object_store(gw_settings)).save(
        path, Checkpoint({"r": 4}, {"w": torch.zeros(2)}, {}, {"step": 1}), base_model=gw_settings.base_models[0])
    async with gateway_client(gw_settings, API_KEYS) as client:
        session_a = (await client.post("/api/v1/create_session", json={}, headers=HEADERS_A)).json()["session_id"]
        sampler = await client.post("/api/v1/create_sampling_session", headers=HEADERS_A, json={
            "session_id": session_a, "sampling_session_seq_id": 0, "base_model": gw_settings.base_models[0]})
        sampler_id = sampler.json()["sampling_session_id"]

        forbidden = [
            ("post", "/api/v1/session_heartbeat", {"session_id": session_a}),
            ("post", "/api/v1/create_model", {"session_id": session_a, "model_seq_id": 1,
                                              "base_model": gw_settings.base_models[0]}),
            ("post", "/api/v1/get_info", {"model_id": model_a}),
            ("post", "/api/v1/optim_step", {"model_id": model_a, "seq_id": 1, "adam_params": {}}),
            ("post", "/api/v1/save_weights", {"model_id": model_a, "path": "x", "seq_id": 1}),
            ("post", "/api/v1/weights_info", {"tinker_path": str(path)}),
            ("get", f"/api/v1/training_runs/{model_a}", None),
            ("get", f"/api/v1/training_runs/{model_a}/checkpoints", None),
            ("delete", f"/api/v1/training_runs/{model_a}/checkpoints/weights/step-1", None),
            ("get", f"/api/v1/samplers/{sampler_id}", None),
            ("post", "/api/v1/asample", {"sampling_session_id": sampler_id, "seq_id": 0, "num_samples": 1,
                                         "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                                         "sampling_params": {"max_tokens": 2}}),
            ("post", "/api/v1/create_sampling_session", {"session_id": session_a, "sampling_session_seq_id": 1,
                                                         "model_path": str(path)}),
        ]
        for method, url, body in forbidden:
            kwargs = {"json": body} if body is not None else {}
            resp = await getattr(client, method)(url, headers=HEADERS_B, **kwargs)
            assert resp.status_code == 404, (url, resp.status_code, resp.text)
        # ... while the owner gets them, and bob's listings are empty.
        assert (await client.get(f"/api/v1/training_runs/{model_a}/checkpoints", headers=HEADERS_A)).json()[
            "checkpoints"][0]["tinker_path"] == str(path)
        assert (await client.get("/api/v1/training_runs", headers=HEADERS_B)).json()["training_runs"] == []
        assert (await client.get("/api/v1/checkpoints", headers=HEADERS_B)).json()["checkpoints"] == []
        assert (await client.get("/adapters", headers=HEADERS_B)).json()["adapters"] == []


async def test_development_mode_accepts_any_tml_key_loudly(gw_settings, caplog):
    model_id = seed_model(gw_settings, "default")
    with caplog.at_level(logging.WARNING):
        async with gateway_client(gw_settings, api_keys=None) as client:
            ok = await client.post("/api/v1/get_info", json={"model_id": model_id},
                                   headers={"X-API-Key": "tml-anything"})
            assert ok.status_code == 200 and ok.json()["model_id"] == model_id
            assert (await client.post("/api/v1/get_info", json={"model_id": model_id},
                                      headers={"X-API-Key": "not-tml"})).status_code == 401
            # The original server's JSON API docs send no key at all.
            keyless = await client.post("/get_info", json={"model_id": model_id})
            assert keyless.status_code == 200 and keyless.json()["model_id"] == model_id
    assert "DEVELOPMENT MODE" in caplog.text
