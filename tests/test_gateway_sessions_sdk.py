"""Sessions, identity and the session trace through the official SDK 0.38, unmodified, on the whole stack with API
keys configured, so every call below also runs the SDK's JWT exchange (auth/token) and sends the JWT; sampling
waits through the SDK's /api/v1/retrieve_futures poller (sample_use_retrieve_futures). Plus, over plain HTTP,
session documents written through two gateways."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
import tinker
from gateway_stack import STACK_CONFIG, in_thread, running_stack
from gateway_support import API_KEYS, KEY_A, KEY_B, gateway_client
from tinker import types

pytest_plugins = ["gateway_support", "gateway_stack"]

CONFIG = replace(STACK_CONFIG, jwt_secret="test-secret", sample_use_retrieve_futures=True)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def session_sequence(url: str, base_model: str) -> dict:
    seen: dict = {}
    service = tinker.ServiceClient(user_metadata={"recipe": "sl"}, display_name="Nightly SFT run", base_url=url,
                                   api_key=KEY_A)
    training = service.create_lora_training_client(base_model=base_model, rank=4, seed=1).result()
    tokens = training.get_tokenizer()("The quick brown fox jumps over the lazy dog.")["input_ids"]
    training.forward_backward([datum(tokens)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    training.save_state("first").result()
    sampler = training.save_weights_and_get_sampling_client().result()
    seen["samples"] = sampler.sample(types.ModelInput.from_ints(tokens[:5]), 2,
                                     types.SamplingParams(max_tokens=3, seed=1)).result()
    # issue 16.6: image chunks need a vision model; the SDK gets a 400 that says the served models are text-only
    text = types.EncodedTextChunk(tokens=tokens[:3])
    image = types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=2)
    pointer = types.ImageAssetPointerChunk(format="jpeg", location="s3://bucket/cat.jpg", expected_tokens=2)
    for chunk in (image, pointer):
        with pytest.raises(tinker.BadRequestError, match="text-only"):
            sampler.sample(types.ModelInput(chunks=[text, chunk]), 1, types.SamplingParams(max_tokens=2)).result()
    # (the SDK's protobuf encoder itself refuses an image pointer in a forward; an image gets to us)
    with pytest.raises(tinker.BadRequestError, match="text-only"):
        training.forward([types.Datum(model_input=types.ModelInput(chunks=[text, image]), loss_fn_inputs={
            "target_tokens": [1] * 5, "weights": [1.0] * 5})], "cross_entropy").result()
    session_id = seen["session_id"] = training.model_id.rsplit(":train:", 1)[0]
    seen["model_id"] = training.model_id

    rest = tinker.RestClient(base_url=url, api_key=KEY_A)
    seen["whoami"] = rest.whoami().result()
    seen["get"] = rest.get_session(session_id).result()
    rest.assign_session_project(session_id, "proj-x").result()
    seen["list"] = rest.list_sessions(limit=5).result()
    seen["by_name"] = rest.search_sessions(types.SessionSearchRequest(display_name="sft NIGHTLY")).result()
    seen["by_project_active"] = rest.search_sessions(types.SessionSearchRequest(
        project_ids=["proj-x"], statuses=[types.ActiveSessionStatusQuery()], user_metadata={"recipe": "sl"})).result()
    seen["no_match"] = rest.search_sessions(types.SessionSearchRequest(display_name="rl")).result()
    url_ = rest.export_session_trace(session_id).result()
    with urllib.request.urlopen(url_) as response:  # a plain GET, no API key, as the SDK's CLI downloads it
        seen["trace"] = json.loads(response.read())
    try:
        urllib.request.urlopen(url_.replace("signature=", "signature=x"))
    except urllib.error.HTTPError as exc:
        seen["forged_link"] = exc.code
    service.close("success").result()
    second = tinker.ServiceClient(base_url=url, api_key=KEY_A)  # a newer session of alice's
    second.create_sampling_client(base_model=base_model).result()

    bob = tinker.RestClient(base_url=url, api_key=KEY_B)
    seen["bob_list"] = bob.list_sessions().result()
    with pytest.raises(tinker.NotFoundError):
        bob.get_session(session_id).result()
    alice = tinker.RestClient(base_url=url, api_key=KEY_A)
    seen["finished"] = alice.search_sessions(types.SessionSearchRequest(
        statuses=[types.ClientFinishedSessionStatusQuery(reasons=["success"])])).result()
    seen["page1"] = alice.search_sessions(types.SessionSearchRequest(limit=1)).result()
    after_first = types.SessionSearchRequest(limit=1, cursor=seen["page1"].next_cursor)
    seen["page2"] = alice.search_sessions(after_first).result()
    return seen


def spans_by_request(trace: dict) -> dict[str, dict[str, dict]]:
    """request_id -> {category: the complete event}, checking the Chrome-trace shape on the way."""
    assert isinstance(trace["traceEvents"], list)
    found: dict[str, dict[str, dict]] = {}
    for event in trace["traceEvents"]:
        assert event["ph"] in ("X", "M", "i") and isinstance(event["pid"], int) and isinstance(event["tid"], int)
        if event["ph"] == "X":
            assert isinstance(event["ts"], int) and isinstance(event["dur"], int) and event["dur"] >= 0
            found.setdefault(event["args"]["request_id"], {})[event["cat"]] = event
    return found


async def test_sessions_identity_and_trace_through_the_sdk(stack_settings):
    base_model = stack_settings.base_models[0]
    async with running_stack(stack_settings, CONFIG, api_keys=API_KEYS) as url:
        seen = await in_thread(session_sequence, url, base_model)
    session_id = seen["session_id"]
    assert len(seen["samples"].sequences) == 2  # through the retrieve_futures poller
    assert seen["whoami"].user_urn == "tml:user:alice" and seen["whoami"].org_urn == "tml:organization:alice"
    assert seen["whoami"].email is None

    got = seen["get"]
    assert got.training_run_ids == [seen["model_id"]]
    assert got.sampler_ids and all(s.startswith(f"{session_id}:sample:") for s in got.sampler_ids)
    assert got.user_metadata == {"recipe": "sl"} and got.display_name == "Nightly SFT run"
    assert seen["list"].sessions[0] == session_id and session_id not in seen["bob_list"].sessions

    [by_name] = seen["by_name"].sessions
    assert by_name.session_id == session_id and by_name.owner == "tml:user:alice"
    [summary] = seen["by_project_active"].sessions
    assert summary.project_id == "proj-x" and summary.status.type == "active"
    assert summary.checkpoints_count >= 1 and summary.checkpoint_storage_bytes > 0
    assert seen["no_match"].sessions == [] and seen["no_match"].next_cursor is None
    assert [s.session_id for s in seen["finished"].sessions] == [session_id]
    assert seen["finished"].sessions[0].status.reason.type == "success"
    [newest], [older] = seen["page1"].sessions, seen["page2"].sessions  # newest first, one page each
    assert older.session_id == session_id != newest.session_id and seen["page2"].next_cursor is None
    assert newest.status.type == "active" and seen["page1"].next_cursor is not None

    spans = spans_by_request(seen["trace"])
    kinds = {}
    for by_category in spans.values():
        assert {"queue", "compute"} <= by_category.keys()  # every request here was computed
        queue, compute = by_category["queue"], by_category["compute"]
        assert abs(queue["ts"] + queue["dur"] - compute["ts"]) <= 1 and queue["tid"] == compute["tid"]
        kinds[compute["name"]] = kinds.get(compute["name"], 0) + 1
    assert {"create_model", "forward_backward", "optim_step", "save_weights", "sample"} <= kinds.keys()
    assert seen["forged_link"] == 401


async def test_a_heartbeat_on_another_gateway_keeps_the_project(gw_settings):
    """Each gateway caches sessions; a heartbeat re-reads the stored document, so it never undoes what another
    gateway wrote (the SDK heartbeats every few seconds, wherever its requests land)."""
    headers = {"X-API-Key": KEY_A}
    async with gateway_client(gw_settings, API_KEYS) as a, gateway_client(gw_settings, API_KEYS) as b:
        session_id = (await a.post("/api/v1/create_session", json={}, headers=headers)).json()["session_id"]
        beat = {"session_id": session_id}
        assert (await b.post("/api/v1/session_heartbeat", json=beat, headers=headers)).status_code == 200  # b caches
        moved = await a.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": "p2"}, headers=headers)
        assert moved.status_code == 200
        assert (await b.post("/api/v1/session_heartbeat", json=beat, headers=headers)).status_code == 200
        await a.post(f"/api/v1/sessions/{session_id}/finish", json={"reason": {"type": "errored"}}, headers=headers)
        assert (await b.post("/api/v1/session_heartbeat", json=beat, headers=headers)).status_code == 410
        found = await b.post("/api/v1/sessions/search", json={"project_ids": ["p2"]}, headers=headers)
        [summary] = found.json()["sessions"]
        assert summary["session_id"] == session_id and summary["status"]["reason"]["type"] == "errored"
        missing = await b.put(f"/api/v1/sessions/{session_id}/project", json={"project_id": ""}, headers=headers)
        assert missing.status_code == 400  # the SDK documents a 400 for a missing project
