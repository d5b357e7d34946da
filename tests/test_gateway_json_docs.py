"""The original server's two documents (README and integration guide, ../shared/seeds/) are a contract: every
example request they show, sent as written (their `...` placeholders filled with real values, and no API key,
as they send none) to the whole stack with SmolLM2, answers with the fields they document."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pytest
from gateway_stack import running_stack

from bus_gateway.chat_data import tokenize_conversation
from bus_runtime.base_models import load_tokenizer

pytest_plugins = ["gateway_support", "gateway_stack"]
pytestmark = pytest.mark.slow

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SUPERVISED = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]]


async def retrieve(client: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    """POST /retrieve_future as the documents do; 202 means still pending, so ask again."""
    for _ in range(30):
        resp = await client.post("/retrieve_future", json={"request_id": request_id})
        if resp.status_code != 202:
            assert resp.status_code == 200, resp.text
            result = resp.json()
            assert result["status"] == "complete", result
            return result
    raise TimeoutError(f"{request_id} still pending")


async def train_and_report(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    assert resp.status_code == 200, resp.text
    result = await retrieve(client, resp.json()["request_id"])
    assert isinstance(result["loss"], float) and math.isfinite(result["loss"])
    return result


def readme_ppo_inputs(tokenizer: Any) -> dict[str, list[list[float]]]:
    """The README's `[[...]]` placeholders: one value per answer token (a list lines up with the end)."""
    conversation = [{"role": "user", "content": "What is 10-3?"}, {"role": "assistant", "content": "7"}]
    ids, assistant = tokenize_conversation(tokenizer, conversation, "data[0]")
    mask = assistant[1:]
    answer = ids[1:][int(np.flatnonzero(mask)[0]):].tolist()
    return {"target_tokens": [answer], "logprobs": [[-0.5] * len(answer)], "advantages": [[1.0] * len(answer)]}


async def test_every_documented_request_answers_as_documented(stack_settings):
    settings = replace(stack_settings, base_models=(SMOLLM2,))
    tokenizer = await asyncio.to_thread(load_tokenizer, SMOLLM2)
    async with running_stack(settings) as url, httpx.AsyncClient(base_url=url, timeout=180) as client:
        # Health & Info.
        assert (await client.get("/healthz")).json()["status"] == "ok"
        capabilities = (await client.get("/get_server_capabilities")).json()
        assert [m["model_name"] for m in capabilities["supported_models"]] == [SMOLLM2]
        losses = (await client.get("/loss_functions")).json()
        assert {"cross_entropy", "importance_sampling", "ppo"} <= set(losses["available_loss_functions"])
        assert set(losses["descriptions"]) == set(losses["available_loss_functions"])

        # README, "Supervised Learning": the first call for "my-model" creates it.
        result = await train_and_report(client, "/fwdbwd", {
            "model_id": "my-model", "data": SUPERVISED, "loss_fn": "cross_entropy"})
        metrics = result["metrics"]
        assert metrics["mean_nll"] > 0 and math.isclose(metrics["perplexity"], math.exp(metrics["mean_nll"]),
                                                        rel_tol=1e-4)

        # Integration guide, Example 1 (and "Migration from FastAPI", the same request): the same adapter.
        before = result["loss"]
        result = await train_and_report(client, "/api/v1/forward_backward", {
            "model_id": "my-model", "data": SUPERVISED, "loss_fn": "cross_entropy"})
        assert set(result["metrics"]) >= {"mean_nll", "perplexity"} and result["loss"] == pytest.approx(before)
        optim = await client.post("/api/v1/optim_step", json={"model_id": "my-model",
                                                              "adam_params": {"learning_rate": 5e-4}})
        assert optim.status_code == 200 and (await retrieve(client, optim.json()["request_id"]))["result"]
        after = await train_and_report(client, "/fwdbwd", {"model_id": "my-model", "data": SUPERVISED,
                                                          "loss_fn": "cross_entropy"})
        assert after["loss"] < before  # the step trained the adapter the name stands for

        # README, "RL Training with PPO" (placeholders filled), and the guide's Example 2 verbatim.
        await train_and_report(client, "/fwdbwd", {
            "model_id": "rl-model",
            "data": [[{"role": "user", "content": "What is 10-3?"}, {"role": "assistant", "content": "7"}]],
            "loss_fn": "ppo", "loss_fn_inputs": readme_ppo_inputs(tokenizer)})
        await train_and_report(client, "/api/v1/forward_backward", {
            "model_id": "rl-model",
            "data": [[
                {"role": "user", "content": "What is 10-3?"},
                {"role": "assistant", "content": "10-3=7"}
            ]],
            "loss_fn": "ppo",
            "loss_fn_inputs": {
                "target_tokens": [[220, 16, 15, 489, 220, 18, 284, 220, 22]],
                "logprobs": [[-0.4, -0.5, -0.3, -0.4, -0.3, -0.5, -0.2, -0.4, -0.3]],
                "advantages": [[0.7, 0.7, 0.8, 0.8, 0.9, 0.9, 1.0, 1.0, 1.0]]
            }
        })

        # Generation with a specific adapter, on all three paths.
        for path in ("/api/v1/sample", "/generate", "/sample"):
            sampled = await client.post(path, json={"model_id": "my-model", "prompt": "What is 2+2?",
                                                    "max_tokens": 4, "temperature": 0.0})
            body = sampled.json()
            assert sampled.status_code == 200 and body["status"] == "complete", body
            assert isinstance(body["text"], str) and len(body["sequences"][0]["tokens"]) <= 4
        info = (await client.post("/get_info", json={"model_id": "my-model"})).json()
        assert info["model_id"] == "my-model" and info["model_name"] == SMOLLM2 and info["lora_rank"] == 16

        # LoRA management.
        added = await client.post("/add_lora", json={"model_id": "extra"})
        assert added.status_code == 200 and (await retrieve(client, added.json()["request_id"]))["result"][
            "model_id"] == "extra"
        names = {a["model_id"] for a in (await client.get("/adapters")).json()["adapters"]}
        assert names == {"my-model", "rl-model", "extra"}
        for removal in (client.post("/remove_lora", json={"model_id": "extra"}), client.delete("/adapters/rl-model")):
            resp = await removal
            assert resp.status_code == 200 and (await retrieve(client, resp.json()["request_id"]))
        assert [a["model_id"] for a in (await client.get("/adapters")).json()["adapters"]] == ["my-model"]
