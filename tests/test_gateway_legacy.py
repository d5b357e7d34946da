"""The original server's JSON API: conversations tokenized with the chat template (weight 1 on assistant turns
only), loss and NLL metrics from /retrieve_future, loss function listing, adapters, synchronous sampling."""

from __future__ import annotations

import asyncio
import math

import numpy as np
from gateway_support import (
    API_KEYS,
    HEADERS_A,
    BusProbe,
    gateway_client,
    seed_model,
)

from bus_events import EventType, tensor_from_numpy
from bus_events import payloads as p
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

        logprobs = np.full(len(targets), -2.0, dtype="f4")
        await bus.reply(env, p.ForwardBackwardResult(outputs=[{"logprobs": tensor_from_numpy(logprobs)}],
                                                     metrics={"loss:sum": 8.0}))
        result = (await client.post("/retrieve_future", headers=HEADERS_A,
                                    json={"request_id": resp.json()["request_id"], "timeout": 5})).json()
        assert result["status"] == "complete" and result["loss"] == 8.0
        assert math.isclose(result["metrics"]["mean_nll"], 2.0)
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


async def test_optim_step_loss_functions_and_adapters(gw_settings):
    async with BusProbe(gw_settings) as bus, gateway_client(gw_settings, API_KEYS) as client:
        losses = (await client.get("/loss_functions", headers=HEADERS_A)).json()["loss_functions"]
        assert {loss["name"] for loss in losses} == {spec.name for spec in list_losses()}
        ppo = next(loss for loss in losses if loss["name"] == "ppo")
        assert "advantages" in ppo["required_inputs"] and ppo["config_defaults"]["clip_low_threshold"] == 0.8

        added = (await client.post("/add_lora", headers=HEADERS_A, json={"rank": 4, "alpha": 8})).json()
        env, payload = await bus.next_event(EventType.CREATE_MODEL)
        assert env.model_id == added["model_id"] and added["model_id"].startswith("legacy-")
        assert env.model_id.endswith(":train:0") and payload.lora.rank == 4
        await bus.reply(env, p.ModelInfo(model_id=env.model_id, base_model=payload.base_model, lora_rank=4,
                                         train_attn=True, train_mlp=True, train_unembed=True))
        seed_model(gw_settings, "alice", model_id=env.model_id, session_id=env.model_id.split(":")[0])
        done = (await client.post("/retrieve_future", headers=HEADERS_A,
                                  json={"request_id": added["request_id"]})).json()
        assert done["result"] == {"model_id": added["model_id"], "type": "create_model"}
        assert [a["model_id"] for a in (await client.get("/adapters", headers=HEADERS_A)).json()["adapters"]] == [
            added["model_id"]]

        step = await client.post("/optim_step", headers=HEADERS_A,
                                 json={"model_id": added["model_id"], "learning_rate": 0.01})
        env, payload = await bus.next_event(EventType.OPTIM_STEP)
        assert env.request_id == step.json()["request_id"] and payload.adam_params.learning_rate == 0.01
        pending = await client.post("/retrieve_future", headers=HEADERS_A,
                                    json={"request_id": step.json()["request_id"], "timeout": 0.1})
        assert pending.status_code == 202 and pending.json()["status"] == "pending"

        removed = await client.delete(f"/adapters/{added['model_id']}", headers=HEADERS_A)
        assert removed.status_code == 200
        assert (await bus.next_event(EventType.UNLOAD_MODEL))[0].model_id == added["model_id"]


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
