"""The original server's JSON API against a bus probe: conversations tokenized with the chat template (weight 1 on
assistant turns only), loss and the loss's own metrics from /retrieve_future, loss function listing, adapters by
the caller's names (created on first use, once, per tenant), synchronous sampling."""

from __future__ import annotations

import asyncio
import contextlib
import math

import httpx
import numpy as np
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    HEADERS_B,
    BusProbe,
    gateway_client,
    running_gateway,
    seed_model,
)

from bus_events import EventType, tensor_from_numpy
from bus_events import payloads as p
from bus_gateway.adapter_names import NAME_RULE, named_model_id
from bus_gateway.json_api.schemas import DEFAULT_RANK
from bus_runtime.base_models import load_tokenizer
from loss_plugins import list_losses

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]

pytest_plugins = ["gateway_support"]


async def test_fwdbwd_weights_only_assistant_tokens_and_reports_nll(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    tokenizer = load_tokenizer(gw_settings.base_models[0])
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        resp = await client.post("/fwdbwd", headers=HEADERS_A, json={
            "model_id": model_id, "data": [CONVERSATION], "loss_fn": "cross_entropy"})
        assert resp.status_code == 200, resp.text
        env, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        assert env.seq_id is None  # legacy events are applied in arrival order
        datum = payload.data[0]
        full = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
        assert datum.tokens.numpy().tolist() == full[:-1]
        targets = datum.loss_fn_inputs["target_tokens"].numpy()
        weights = datum.loss_fn_inputs["weights"].numpy()
        assert targets.tolist() == full[1:]
        trained = tokenizer.decode(targets[weights == 1].tolist())
        assert trained == "4<|im_end|>\n6<|im_end|>\n"

        # The metrics come from the loss as it reported them, not re-derived from the logprobs (-3 here).
        logprobs = np.full(len(targets), -3.0, dtype="f4")
        await bus.reply(env, p.ForwardBackwardResult(outputs=[{"logprobs": tensor_from_numpy(logprobs)}], metrics={
            "loss:sum": 8.0, "mean_nll:mean": 2.0, "perplexity:mean": math.exp(2.0)}))
        result = (await client.post("/retrieve_future", headers=HEADERS_A,
                                    json={"request_id": resp.json()["request_id"], "timeout": 5})).json()
        assert result["status"] == "complete" and result["loss"] == 8.0
        assert result["metrics"]["mean_nll"] == 2.0 and result["metrics"]["mean_nll:mean"] == 2.0
        assert math.isclose(result["metrics"]["perplexity"], math.exp(2.0), rel_tol=1e-6)


async def test_json_forward_backward_on_the_v1_path_with_rl_inputs(gw_settings):
    model_id = seed_model(gw_settings, "alice")
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        probe = await client.post("/fwdbwd", headers=HEADERS_A, json={
            "model_id": model_id, "data": [CONVERSATION[:2]], "forward_only": True})
        _, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        n = payload.data[0].tokens.numel
        assert payload.forward_only and probe.status_code == 200
        ppo = await client.post("/api/v1/forward_backward", headers=HEADERS_A, json={
            "model_id": model_id, "data": [CONVERSATION[:2]], "loss_fn": "ppo",
            "loss_fn_inputs": {"logprobs": [[-1.0] * n], "advantages": [0.5]},
            "loss_fn_config": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}})
        assert ppo.status_code == 200, ppo.text
        _, payload = await bus.next_event(EventType.FORWARD_BACKWARD)
        inputs = payload.data[0].loss_fn_inputs
        assert inputs["advantages"].numpy().tolist() == (inputs["weights"].numpy() * 0.5).tolist()
        assert payload.loss_fn == "ppo" and inputs["logprobs"].numel == n

        short = await client.post("/fwdbwd", headers=HEADERS_A, json={
            "model_id": model_id, "data": [CONVERSATION[:2]], "loss_fn": "ppo",
            "loss_fn_inputs": {"logprobs": [[-1.0, -1.0]], "advantages": [1.0]}})
        assert short.status_code == 400 and short.json()["field"] == "loss_fn_inputs.logprobs[0]"
        no_assistant = await client.post("/fwdbwd", headers=HEADERS_A, json={
            "model_id": model_id, "data": [[{"role": "user", "content": "hi"}]]})
        assert no_assistant.status_code == 400 and no_assistant.json()["field"] == "data[0]"
        untyped = await client.post("/api/v1/forward_backward", headers=HEADERS_A,
                                    json={"model_id": model_id, "data": [[{"role": 3}]]})
        assert untyped.status_code == 400 and "$.data[0][0].role" in untyped.json()["detail"]


async def test_loss_functions_in_the_documented_shape(gw_settings):
    async with gateway_client(gw_settings, API_KEYS) as client:
        body = (await client.get("/loss_functions", headers=HEADERS_A)).json()
    specs = list_losses()
    assert body["available_loss_functions"] == [spec.name for spec in specs]
    assert body["descriptions"] == {spec.name: spec.description for spec in specs}
    ppo = next(loss for loss in body["loss_functions"] if loss["name"] == "ppo")
    assert "advantages" in ppo["required_inputs"] and ppo["config_defaults"]["clip_low_threshold"] == 0.8


async def test_add_lora_names_the_adapter_and_every_route_takes_the_name(gw_settings):
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        added = (await client.post("/add_lora", headers=HEADERS_A,
                                   json={"model_id": "my-adapter", "rank": 4, "alpha": 8})).json()
        env, payload = await bus.next_event(EventType.CREATE_MODEL)
        assert added["model_id"] == "my-adapter" and env.model_id == named_model_id("alice", "my-adapter", 0)
        assert env.seq_id == 0 and payload.lora.rank == 4 and payload.user_metadata["adapter_name"] == "my-adapter"
        again = await client.post("/add_lora", headers=HEADERS_A, json={"model_id": "my-adapter"})
        assert again.status_code == 409 and "already exists" in again.json()["detail"]

        await bus.reply(env, p.ModelInfo(model_id=env.model_id, base_model=payload.base_model, lora_rank=4,
                                         train_attn=True, train_mlp=True, train_unembed=True))
        seed_model(gw_settings, "alice", model_id=env.model_id, session_id=env.model_id.split(":")[0])
        done = (await client.post("/retrieve_future", headers=HEADERS_A,
                                  json={"request_id": added["request_id"]})).json()
        assert done["result"] == {"model_id": "my-adapter", "type": "create_model"}
        listed = (await client.get("/adapters", headers=HEADERS_A)).json()["adapters"]
        assert [(a["model_id"], a["training_run_id"]) for a in listed] == [("my-adapter", env.model_id)]
        info = (await client.post("/get_info", headers=HEADERS_A, json={"model_id": "my-adapter"})).json()
        assert info["model_id"] == "my-adapter" and info["model_name"] == payload.base_model

        for path, body in (("/optim_step", {"model_id": "my-adapter", "learning_rate": 0.01}),
                           ("/api/v1/optim_step", {"model_id": "my-adapter", "adam_params": {"learning_rate": 0.01}})):
            step = await client.post(path, headers=HEADERS_A, json=body)
            step_env, step_payload = await bus.next_event(EventType.OPTIM_STEP)
            assert step.json()["request_id"] == step_env.request_id and step_env.model_id == env.model_id
            assert step_payload.adam_params.learning_rate == 0.01 and step.json()["model_id"] == "my-adapter"
        pending = await client.post("/retrieve_future", headers=HEADERS_A,
                                    json={"request_id": step.json()["request_id"], "timeout": 0.1})
        assert pending.status_code == 202 and pending.json()["status"] == "pending"

        removed = await client.delete("/adapters/my-adapter", headers=HEADERS_A)
        assert removed.status_code == 200 and removed.json()["model_id"] == "my-adapter"
        assert (await bus.next_event(EventType.UNLOAD_MODEL))[0].model_id == env.model_id
        gone = await client.post("/optim_step", headers=HEADERS_A, json={"model_id": "my-adapter"})
        assert gone.status_code == 404 and "my-adapter" in gone.json()["detail"]
        again_removed = await client.post("/remove_lora", headers=HEADERS_A, json={"model_id": "my-adapter"})
        assert again_removed.status_code == 404


async def test_first_fwdbwd_creates_the_named_adapter_once_per_tenant(gw_settings):
    conversation = {"data": [CONVERSATION[:2]], "loss_fn": "cross_entropy"}
    async with BusProbe(gw_settings) as bus, running_gateway(gw_settings, API_KEYS) as url_1, \
            running_gateway(gw_settings, API_KEYS) as url_2, httpx.AsyncClient(timeout=60) as client:
        # Three concurrent first calls for one new name on one gateway and two on another.
        calls = [client.post(f"{url}/fwdbwd", headers=HEADERS_A, json={"model_id": "my-model", **conversation})
                 for url in (url_1, url_1, url_1, url_2, url_2)]
        answers = await asyncio.gather(*calls)
        assert [a.status_code for a in answers] == [200] * 5 and {a.json()["model_id"] for a in answers} == {
            "my-model"}
        model_id = named_model_id("alice", "my-model", 0)
        creates = [await bus.next_event(EventType.CREATE_MODEL)]
        fbs = [await bus.next_event(EventType.FORWARD_BACKWARD) for _ in range(5)]
        assert {env.model_id for env, _ in fbs} == {model_id}
        # A gateway that finds the name already recorded by the other one publishes no create of its own.
        with contextlib.suppress(TimeoutError):
            while True:
                creates.append(await bus.next_event(EventType.CREATE_MODEL, timeout=1.0))
        assert 1 <= len(creates) <= 2  # at most one per gateway; duplicates collapse in the trainer's dedupe
        assert {env.model_id for env, _ in creates} == {model_id} and {env.seq_id for env, _ in creates} == {0}
        assert {(c.lora.rank, c.base_model) for _, c in creates} == {(DEFAULT_RANK, gw_settings.base_models[0])}

        other = await client.post(f"{url_1}/fwdbwd", headers=HEADERS_B, json={"model_id": "my-model", **conversation})
        bob_create, _ = await bus.next_event(EventType.CREATE_MODEL)
        assert other.status_code == 200 and bob_create.model_id == named_model_id("bob", "my-model", 0) != model_id

        bad = await client.post(f"{url_1}/fwdbwd", headers=HEADERS_A, json={"model_id": "my model!", **conversation})
        assert bad.status_code == 400 and bad.json()["field"] == "model_id" and NAME_RULE in bad.json()["detail"]


async def test_sync_sample_decodes_text(gw_settings):
    tokenizer = load_tokenizer(gw_settings.base_models[0])
    answer = tokenizer("Paris.")["input_ids"] + [tokenizer.eos_token_id]
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        async def worker() -> None:
            env, payload = await bus.next_event(EventType.SAMPLE)
            assert payload.sampling_params.max_tokens == 8 and payload.num_samples == 1
            await bus.reply(env, p.SampleResult(sequences=[p.SampledSequence(
                tokens=tensor_from_numpy(np.array(answer, dtype="i4")),
                logprobs=tensor_from_numpy(np.full(len(answer), -0.5, dtype="f4")), stop_reason="stop")]))

        task = asyncio.create_task(worker())
        resp = await client.post("/sample", headers=HEADERS_A, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8})
        await task
        body = resp.json()
        assert resp.status_code == 200 and body["text"] == "Paris."
        assert body["sequences"][0]["tokens"] == answer and body["sequences"][0]["stop_reason"] == "stop"
