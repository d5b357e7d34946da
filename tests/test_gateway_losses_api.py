"""The gateway's side of issue 16 item 1 over HTTP: [N, K] shapes, gspo / stable_reinforce names and config,
create_custom_loss (checked, stored, answered on retrieve_future, carried in the forward_backward event), and
Dimuon's create_model / optim_step bodies, each bad input a 400 naming its field."""

from __future__ import annotations

import json

import pytest
import torch
from gateway_support import API_KEYS, HEADERS_A, HEADERS_B, BusProbe, gateway_client, seed_model
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss
from tinker.proto.request_conv import forward_backward_request_to_proto

from bus_events import EventType

PROTO = {**HEADERS_A, "Content-Type": "application/x-protobuf"}

pytest_plugins = ["gateway_support"]


def _tensor(values, dtype: str) -> types.TensorData:
    array = torch.as_tensor(values)
    return types.TensorData(data=array.flatten().tolist(), dtype=dtype, shape=list(array.shape))


def _fb(model_id: str, seq_id: int, datums: list[dict], loss_fn="cross_entropy", config=None) -> bytes:
    data = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={k: _tensor(v, "int64" if k == "target_tokens" else "float32")
                                        for k, v in d.items()}) for d in datums]
    request = types.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, forward_backward_input=(
        types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config)))
    return forward_backward_request_to_proto(request).SerializeToString()


TOPK = [[2, 5], [3, 6], [4, 7]]


@pytest.mark.parametrize(("datums", "loss_fn", "config", "field", "message"), [
    ([{"target_tokens": TOPK, "weights": [1.0, 1.0, 1.0]}], "cross_entropy", None,
     "data[0].loss_fn_inputs.weights", "differs from target_tokens shape [3, 2]"),
    ([{"target_tokens": torch.zeros(3, 0, dtype=torch.int64)}], "cross_entropy", None,
     "data[0].loss_fn_inputs.target_tokens", "K ≥ 1"),
    ([{"target_tokens": TOPK}, {"target_tokens": [[2], [3], [4]]}], "cross_entropy", None,
     "data[1].loss_fn_inputs.target_tokens", "same number K"),
    ([{"target_tokens": [2, 3, 4], "logprobs": [-1.0] * 3, "advantages": [1.0] * 3}], "gspo", {"epsilon": 0.2},
     "loss_fn_config.epsilon", "unknown key for loss_fn 'gspo'"),
    ([{"target_tokens": [2, 3, 4], "logprobs": [-1.0] * 3, "advantages": [1.0] * 3}], "stable_reinforce", None,
     "loss_fn", "record_stability_info"),
    ([{"target_tokens": [2, 3, 4]}], "custom", {"loss_id": "sess-alice:loss:9"}, "loss_fn_config.loss_id",
     "no custom loss"),
])
async def test_bad_loss_requests_name_the_field(gw_settings, datums, loss_fn, config, field, message):
    model_id = seed_model(gw_settings, "alice")
    async with gateway_client(gw_settings, API_KEYS) as client:
        resp = await client.post("/api/v1/forward_backward", content=_fb(model_id, 1, datums, loss_fn, config),
                                 headers=PROTO)
        assert resp.status_code in (400, 404), resp.text
        assert resp.json()["field"] == field and message in resp.json()["detail"]


def _traced(fn, ranks) -> dict:
    handle = trace_loss(fn, ranks, "sess-alice")
    return {"name": handle.name, "inputs": [i.model_dump(mode="json") for i in handle.inputs],
            "graph": encode_graph(handle).model_dump(mode="json")}


def _nll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/nll:sum": loss}


async def test_create_custom_loss_is_checked_stored_and_carried_in_the_event(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    body = {"session_id": "sess-alice", "custom_loss_seq_id": 0, **_traced(_nll, {"logprobs": 1, "weights": 1})}
    hostile = json.loads(json.dumps(body))
    hostile["graph"]["nodes"][3]["target"] = "builtins.eval"
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        config = (await client.post("/api/v1/client/config", json={}, headers=HEADERS_A)).json()
        assert config["custom_loss_server_side"] is True
        refused = await client.post("/api/v1/create_custom_loss", json={**hostile, "custom_loss_seq_id": 1},
                                    headers=HEADERS_A)
        assert refused.status_code == 400 and refused.json()["field"] == "graph.nodes[3].target"
        created = await client.post("/api/v1/create_custom_loss", json=body, headers=HEADERS_A)
        assert created.status_code == 200, created.text
        result = await client.post("/api/v1/retrieve_future", json={"request_id": created.json()["request_id"]},
                                   headers=HEADERS_A)
        assert result.json() == {"loss_id": "sess-alice:loss:0", "type": "create_custom_loss"}
        other = await client.post("/api/v1/retrieve_future", json={"request_id": created.json()["request_id"]},
                                  headers=HEADERS_B)
        assert other.json()["category"] == "user" and "no custom loss" in other.json()["error"]
        # The same seq with another graph is a conflict.
        clash = await client.post("/api/v1/create_custom_loss", headers=HEADERS_A, json={
            **body, **_traced(lambda logprobs: (logprobs.sum(), {}), {"logprobs": 1})})
        assert clash.status_code == 409 and clash.json()["field"] == "custom_loss_seq_id"
        fb = await client.post("/api/v1/forward_backward", headers=PROTO, content=_fb(
            model_id, 1, [{"target_tokens": [2, 3, 4], "weights": [1.0, 0.0, 1.0]}], "custom",
            {"loss_id": "sess-alice:loss:0"}))
        assert fb.status_code == 200, fb.text
        _, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        assert payload.loss_fn == "custom" and payload.loss_fn_config["loss_id"] == "sess-alice:loss:0"
        assert json.loads(payload.loss_fn_config["graph"])["name"] == "_nll"
        missing = await client.post("/api/v1/forward_backward", headers=PROTO, content=_fb(
            model_id, 2, [{"target_tokens": [2, 3, 4]}], "custom", {"loss_id": "sess-alice:loss:0"}))
        assert missing.status_code == 400 and missing.json()["field"] == "data[0].loss_fn_inputs.weights"


async def test_dimuon_bodies(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    base = gw_settings.base_models[0]
    create = {"session_id": "sess-alice", "model_seq_id": 5, "base_model": base, "type": "create_model"}
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        for config, field in (({"type": "sgd"}, "optimizer_config.type"),
                              ({"type": "dimuon", "version": 2}, "optimizer_config.version")):
            bad = await client.post("/api/v1/create_model", json={**create, "optimizer_config": config},
                                    headers=HEADERS_A)
            assert bad.status_code == 400 and bad.json()["field"] == field, bad.text
        ok = await client.post("/api/v1/create_model", headers=HEADERS_A,
                               json={**create, "optimizer_config": {"type": "dimuon", "version": 1}})
        assert ok.status_code == 200, ok.text
        assert (await bus.next_event(EventType.CREATE_MODEL))[1].optimizer.type == "dimuon"
        params = {"type": "dimuon", "learning_rate": 0.01, "grad_clip_norm": 0.0, "beta1": 1.5}
        bad = await client.post("/api/v1/optim_step", headers=HEADERS_A, json={
            "model_id": model_id, "seq_id": 1, "optimizer_params": params})
        assert bad.status_code == 400 and bad.json()["field"] == "optimizer_params.beta1", bad.text
        good = await client.post("/api/v1/optim_step", headers=HEADERS_A, json={
            "model_id": model_id, "seq_id": 2, "optimizer_params": {**params, "beta1": 0.5}})
        assert good.status_code == 200, good.text
        _, step = await bus.next_event(EventType.OPTIM_STEP)
        assert step.dimuon_params is not None and step.dimuon_params.beta1 == 0.5
