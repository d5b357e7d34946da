"""The export job through the REST API on the whole stack (real Tansu + moto S3, tiny model): train with the SDK,
save sampler weights, POST /api/v1/export_model, retrieve the future, download the files from the presigned URLs,
and load them with plain transformers: base + adapter's logits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import tinker
import torch
from export_support import merged_logits, peft_logits
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types

from artifact_store import CheckpointStore, TinkerPath
from bus_runtime.settings import open_object_store

pytest_plugins = ["gateway_support", "gateway_stack"]


def train_and_save(url: str, base_model: str) -> str:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=base_model, rank=4).result()
    tokens = [1, 5, 9, 33, 70, 2, 101, 7]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return training.save_weights_for_sampler("to-export").result().path


async def _result(client: httpx.AsyncClient, request_id: str) -> dict:
    for _ in range(30):
        body = (await client.post("/api/v1/retrieve_future", json={"request_id": request_id})).json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"export {request_id} still pending")


async def test_export_job_gives_downloadable_merged_model(stack_settings, tmp_path: Path):
    base_model = stack_settings.base_models[0]
    async with running_stack(stack_settings) as url:
        path = await in_thread(train_and_save, url, base_model)
        run_id = TinkerPath.parse(path).run_id
        async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
            bad = await client.post("/api/v1/export_model", json={"path": path, "dtype": "int8"})
            assert bad.status_code == 400 and "dtype" in bad.text, bad.text
            missing = await client.post("/api/v1/export_model",
                                        json={"path": f"tinker://{run_id}/sampler_weights/nope"})
            assert missing.status_code == 404, missing.text
            job = await client.post("/api/v1/export_model", json={"path": path, "url_ttl_seconds": 600})
            assert job.status_code == 200, job.text
            result = await _result(client, job.json()["request_id"])
        assert result["path"] == path and result["prefix"] == f"runs/{run_id}/exports/sampler_weights-to-export/"
        assert {"config.json", "model.safetensors"} <= set(result["urls"]), result
        out = tmp_path / "downloaded"
        out.mkdir()
        async with httpx.AsyncClient(timeout=60) as plain:
            for name, link in result["urls"].items():
                response = await plain.get(link)
                assert response.status_code == 200, (name, response.text[:200])
                (out / name).write_bytes(response.content)
        assert sum(f.stat().st_size for f in out.iterdir()) == result["size_bytes"]
    checkpoint = await asyncio.to_thread(CheckpointStore(open_object_store(stack_settings)).load,
                                         TinkerPath.parse(path))
    expected = peft_logits(Path(base_model), checkpoint.adapter_config, checkpoint.adapter_weights, tmp_path / "ad")
    assert (expected - merged_logits(Path(base_model))).abs().max() > 1e-4  # training moved the adapter
    torch.testing.assert_close(merged_logits(out), expected, rtol=1e-5, atol=1e-5)
