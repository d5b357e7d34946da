"""Checkpoints through the official tinker SDK 0.38, unmodified, on the whole stack (real Tansu + moto S3, tiny
model): save_weights_external and its signed download URLs, the SDK CLI's `tinker checkpoint download` producing
an adapter PEFT loads, publish / unpublish / copy_weights across two tenants, and 0.39's search_checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from gateway_stack import in_thread, running_stack
from gateway_support import API_KEYS, HEADERS_B, KEY_A, KEY_B
from safetensors.torch import load_file
from tinker import types

pytest_plugins = ["gateway_support", "gateway_stack"]

PROMPT = [1, 5, 9, 33, 70, 2, 101, 7]


def _trained(service: tinker.ServiceClient, base_model: str) -> tinker.TrainingClient:
    """A LoRA model two steps away from its init (LoRA B starts at zero: an untrained adapter proves nothing)."""
    training = service.create_lora_training_client(base_model=base_model, rank=4, seed=3).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT[:-1]),
                        loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)})
    for _ in range(2):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return training


def _trainer_logprobs(training: tinker.TrainingClient) -> np.ndarray:
    datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT[:-1]),
                        loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)})
    out = training.forward([datum], "cross_entropy").result()
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)


def _peft_logprobs(base_model: str, adapter_dir: Path) -> np.ndarray:
    """What plain PEFT makes of a downloaded adapter folder: the proof that the file loads and is the model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
                                      adapter_dir)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT[:-1]])).logits[0]
    return torch.log_softmax(logits, -1)[torch.arange(len(PROMPT) - 1), torch.tensor(PROMPT[1:])].double().numpy()


def _download(urls: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, url in urls.items():
        with urllib.request.urlopen(url, timeout=30) as resp:  # what the SDK CLI does: a plain GET, no key
            (dest / name).write_bytes(resp.read())


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def export_and_urls(url: str, base_model: str, dest: Path) -> dict:
    service = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    training = _trained(service, base_model)
    seen: dict = {"model_id": training.model_id, "trainer": _trainer_logprobs(training)}
    saved = training.save_weights_external("export", ttl_seconds=7200).result()
    seen["saved"] = saved
    rest = tinker.RestClient(base_url=url, api_key=KEY_A)
    urls = rest.get_external_weights_urls(saved.path).result()
    seen["urls"] = urls
    _download(urls.urls, dest)
    seen["listed"] = {c.checkpoint_id: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
        training.save_weights_external("secret", age_encryption_recipients=["age1xyz"]).result()
    again = training.save_weights_external("export").result()  # unchanged weights: the same save, not a conflict
    seen["again"] = again.path
    seen["state_path"] = training.save_state("final").result().path
    rest.delete_checkpoint_from_tinker_path(saved.path).result()
    seen["after_delete"] = _status_of(next(iter(urls.urls.values())))  # a deleted checkpoint revokes its URLs
    service.close("success").result()
    return seen


async def test_save_weights_external_and_cli_download_give_an_adapter_peft_loads(stack_settings, tmp_path):
    base_model = stack_settings.base_models[0]
    async with running_stack(stack_settings, api_keys=API_KEYS) as url:
        seen = await in_thread(export_and_urls, url, base_model, tmp_path / "via-sdk")
        env = {**os.environ, "TINKER_BASE_URL": url, "TINKER_API_KEY": KEY_A}
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tinker.cli", "-f", "json", "checkpoint", "download", seen["state_path"],
            "--output", str(tmp_path / "via-cli"), env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), timeout=300)
        assert cli.returncode == 0, err.decode()[-3000:]
        runs = await in_thread(lambda: tinker.RestClient(base_url=url, api_key=KEY_A).list_training_runs()
                               .result().training_runs)
    saved = seen["saved"]
    assert saved.path == f"tinker://{seen['model_id']}/external_weights/export"
    files = {p.name: p.stat().st_size for p in (tmp_path / "via-sdk").iterdir()}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    listed = seen["listed"]["external_weights/export"]  # (the SDK drops the result's size_bytes)
    assert (listed.checkpoint_type, listed.size_bytes, listed.public) == ("external", sum(files.values()), False)
    assert set(seen["urls"].urls) == set(files) and seen["urls"].expires.tzinfo is not None
    assert seen["after_delete"] == 404 and seen["again"] == saved.path
    # The exported adapter is the trained model, through plain PEFT.
    np.testing.assert_allclose(_peft_logprobs(base_model, tmp_path / "via-sdk"), seen["trainer"], atol=1e-4)

    # The CLI: training state -> temporary training run -> save_weights_external -> signed URLs -> files.
    result = json.loads(out)
    folder = Path(result["destination"])
    assert folder.parent == tmp_path / "via-cli" and result["file_size_bytes"] > 0
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    cli_weights, sdk_weights = (load_file(str(d / "adapter_model.safetensors")) for d in (folder, tmp_path / "via-sdk"))
    assert cli_weights.keys() == sdk_weights.keys()  # same model state: the state was saved right after the export
    assert all(torch.equal(cli_weights[k], sdk_weights[k]) for k in cli_weights)
    np.testing.assert_allclose(_peft_logprobs(base_model, folder), seen["trainer"], atol=1e-4)
    # The CLI deleted its temporary export; its run is the one with the CLI's metadata.
    cli_run = next(r for r in runs if (r.user_metadata or {}).get("created_by") == "tinker checkpoint download")
    assert cli_run.last_checkpoint is None and cli_run.last_sampler_checkpoint is None


def sharing(url: str, base_model: str, tmp: Path) -> dict:
    alice = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    bob = tinker.ServiceClient(base_url=url, api_key=KEY_B)
    rest_a, rest_b = (tinker.RestClient(base_url=url, api_key=key) for key in (KEY_A, KEY_B))
    training = _trained(alice, base_model)
    state = training.save_state("state").result().path
    sampler = training.save_weights_for_sampler("shared").result().path
    external = training.save_weights_external("ext").result().path
    seen: dict = {"trainer": _trainer_logprobs(training)}

    def refused(what: str, call) -> None:
        with pytest.raises(tinker.NotFoundError):
            call()
        seen.setdefault("refused", []).append(what)

    def bob_cannot_read() -> None:
        refused("weights_info", lambda: rest_b.get_weights_info_by_tinker_path(state).result())
        refused("load", lambda: bob.create_training_client_from_state(state).result())
        refused("sample", lambda: bob.create_sampling_client(model_path=sampler).result().sample(
            types.ModelInput.from_ints(PROMPT[:3]), 1, types.SamplingParams(max_tokens=2)).result())
        refused("copy", lambda: rest_b.copy_weights(sampler, "proj-b").result())
        refused("urls", lambda: rest_b.get_external_weights_urls(external).result())

    # Private: bob can neither read nor change alice's checkpoints.
    bob_cannot_read()
    refused("publish", lambda: rest_b.publish_checkpoint_from_tinker_path(sampler).result())
    refused("delete", lambda: rest_b.delete_checkpoint_from_tinker_path(sampler).result())
    for path in (state, sampler, external, sampler):  # publishing a public one again is a no-op
        rest_a.publish_checkpoint_from_tinker_path(path).result()
    seen["alice_lists"] = {c.checkpoint_id: c.public for c in rest_a.list_checkpoints(training.model_id).result()
                           .checkpoints}

    # Published: bob reads every way the SDK offers, and still cannot change or list them.
    seen["info"] = rest_b.get_weights_info_by_tinker_path(state).result()
    loaded = bob.create_training_client_from_state(state).result()
    seen["bob_loaded"] = _trainer_logprobs(loaded)
    bob_sampler = bob.create_sampling_client(model_path=sampler).result()
    seen["bob_sample"] = bob_sampler.sample(types.ModelInput.from_ints(PROMPT[:3]), 1,
                                            types.SamplingParams(max_tokens=2, seed=1)).result()
    urls = rest_b.get_external_weights_urls(external).result().urls
    _download(urls, tmp / "bob")
    seen["bob_peft_dir"] = tmp / "bob"
    seen["copy"] = rest_b.copy_weights(sampler, "proj-b").result()
    seen["bob_checkpoints"] = [c.tinker_path for c in rest_b.list_user_checkpoints().result().checkpoints]
    refused("unpublish", lambda: rest_b.unpublish_checkpoint_from_tinker_path(sampler).result())
    refused("delete", lambda: rest_b.delete_checkpoint_from_tinker_path(sampler).result())
    refused("list", lambda: rest_b.list_checkpoints(training.model_id).result())

    # Unpublished: revoked at once, download URLs bob already holds included; bob's copy is his own.
    for path in (state, sampler, external, sampler):
        rest_a.unpublish_checkpoint_from_tinker_path(path).result()
    bob_cannot_read()
    refused("sample_in_open_session", lambda: bob_sampler.sample(
        types.ModelInput.from_ints(PROMPT[:3]), 1, types.SamplingParams(max_tokens=2)).result())
    seen["revoked_url"] = _status_of(next(iter(urls.values())))
    seen["copy_info"] = rest_b.get_weights_info_by_tinker_path(seen["copy"]).result()
    seen["copy_sample"] = bob.create_sampling_client(model_path=seen["copy"]).result().sample(
        types.ModelInput.from_ints(PROMPT[:3]), 1, types.SamplingParams(max_tokens=2, seed=1)).result()
    refused("copy_of_copy_by_alice", lambda: rest_a.copy_weights(seen["copy"], "proj-a").result())
    seen["paths"] = (state, sampler, external)
    seen["alice_model"] = training.model_id
    for client in (alice, bob):
        client.close("success").result()
    return seen


async def test_publish_shares_with_other_tenants_and_unpublish_revokes(stack_settings, tmp_path):
    base_model = stack_settings.base_models[0]
    async with running_stack(stack_settings, api_keys=API_KEYS) as url:
        seen = await in_thread(sharing, url, base_model, tmp_path)
        sampler = seen["paths"][1]
        # Copying into a session slot is idempotent on retry; a slot holding another model is refused.
        async with httpx.AsyncClient(base_url=url, headers=HEADERS_B, timeout=30) as client:
            session = (await client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"})
                       ).json()["session_id"]
            body = {"source_path": seen["copy"], "session_id": session, "model_seq_id": 5, "ttl_seconds": 3600}
            first = await client.post("/api/v1/copy_weights", json=body)
            again = await client.post("/api/v1/copy_weights", json=body)
            other = await client.post("/api/v1/copy_weights", json={**body, "source_path": sampler})
            short_ttl = await client.post("/api/v1/copy_weights", json={**body, "ttl_seconds": 60})
            token = await client.post("/api/v1/copy_weights", json=body,
                                      headers={"X-Tinker-Weights-Access-Token": "secret"})
            trains = await client.post("/api/v1/optim_step", json={"model_id": f"{session}:train:5", "seq_id": 0})
            copy_route = seen["copy"].removeprefix("tinker://").split("/", 1)
            publish_url = f"/api/v1/training_runs/{copy_route[0]}/checkpoints/{copy_route[1]}/publish"
            published = [(await client.post(publish_url)).json()["changed"] for _ in range(2)]
    assert seen["refused"].count("weights_info") == 2
    assert {"copy_of_copy_by_alice", "sample_in_open_session"} <= set(seen["refused"])
    assert seen["alice_lists"] == {"weights/state": True, "sampler_weights/shared": True,
                                   "external_weights/ext": True}
    assert seen["info"].base_model == base_model and seen["info"].lora_rank == 4
    np.testing.assert_allclose(seen["bob_loaded"], seen["trainer"], atol=1e-5)  # the trainer let bob load it
    assert len(seen["bob_sample"].sequences[0].tokens) >= 1
    np.testing.assert_allclose(_peft_logprobs(base_model, seen["bob_peft_dir"]), seen["trainer"], atol=1e-4)
    copy = seen["copy"]
    assert copy.startswith("tinker://copy-") and copy.endswith("/sampler_weights/shared")
    assert copy in seen["bob_checkpoints"] and sampler not in seen["bob_checkpoints"]
    assert seen["revoked_url"] == 404
    assert seen["copy_info"].base_model == base_model and seen["copy_info"].lora_rank == 4
    assert seen["copy_sample"].sequences[0].tokens == seen["bob_sample"].sequences[0].tokens  # same weights
    assert first.status_code == 200 and again.json() == first.json()
    assert first.json()["tinker_path"] == f"tinker://{session}:train:5/sampler_weights/shared"
    assert other.status_code == 404  # alice's sampler weights are private again
    assert short_ttl.status_code == 400 and short_ttl.json()["field"] == "ttl_seconds"
    assert token.status_code == 400 and token.json()["field"] == "weights_access_token"
    assert trains.status_code == 404  # a copy's run cannot be trained on
    assert published == [True, False]  # the second publish is a no-op, not a 409 the SDK would retry for minutes


async def test_search_checkpoints_own_and_accessible(stack_settings):
    """SDK 0.39's search_checkpoints (0.39 is not installed: plain HTTP in the shape checkpoint_sharing.py
    documents)."""
    base_model = stack_settings.base_models[0]

    def save_some(url: str) -> tuple[str, list[str]]:
        alice = tinker.ServiceClient(base_url=url, api_key=KEY_A)
        training = alice.create_lora_training_client(base_model=base_model, rank=4).result()
        paths = [training.save_weights_for_sampler(f"s{i}", user_metadata={"i": str(i)}).result().path
                 for i in range(3)]
        paths.append(training.save_state("state").result().path)
        tinker.RestClient(base_url=url, api_key=KEY_A).publish_checkpoint_from_tinker_path(paths[1]).result()
        alice.close("success").result()
        return training.model_id, paths

    async with running_stack(stack_settings, api_keys=API_KEYS) as url:
        model_id, paths = await in_thread(save_some, url)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def search(key: str, **body) -> dict:
                resp = await client.post("/api/v1/checkpoints/search", json=body, headers={"X-API-Key": key})
                assert resp.status_code == 200, resp.text
                return resp.json()

            own = await search(KEY_A)
            first_page = await search(KEY_A, limit=2)
            second_page = await search(KEY_A, limit=2, cursor=first_page["next_cursor"])
            samplers = await search(KEY_A, checkpoint_types=["sampler"], user_metadata={"i": "2"})
            by_name = await search(KEY_A, name="S1", public=True)
            bob_own = await search(KEY_B)
            bob_accessible = await search(KEY_B, owner={"type": "accessible"})
            bad_limit = await client.post("/api/v1/checkpoints/search", json={"limit": 500}, headers=HEADERS_B)
    newest_first = [paths[3], paths[2], paths[1], paths[0]]
    assert [c["tinker_path"] for c in own["checkpoints"]] == newest_first and own.get("next_cursor") is None
    assert own["checkpoints"][0]["base_model"] == base_model  # 0.39's Checkpoint.base_model
    assert [c["tinker_path"] for c in first_page["checkpoints"] + second_page["checkpoints"]] == newest_first
    assert second_page.get("next_cursor") is None
    assert [c["tinker_path"] for c in samplers["checkpoints"]] == [paths[2]]
    assert [c["tinker_path"] for c in by_name["checkpoints"]] == [paths[1]]
    assert bob_own["checkpoints"] == []
    assert [(c["tinker_path"], c["public"]) for c in bob_accessible["checkpoints"]] == [(paths[1], True)]
    assert bad_limit.status_code == 400
    assert all(p.startswith(f"tinker://{model_id}/") for p in paths)


async def test_upload_an_adapter_as_external_weights(stack_settings, tmp_path):
    """SDK 0.39's external_weights_upload_start / _finish (plain HTTP in the shape external_uploads.py documents):
    an adapter downloaded from one run comes back as a checkpoint of its own that samples the same."""
    base_model = stack_settings.base_models[0]

    def export(url: str) -> tuple[str, dict[str, str]]:
        service = tinker.ServiceClient(base_url=url, api_key=KEY_A)
        training = _trained(service, base_model)
        sampler = training.save_weights_for_sampler("orig").result().path
        external = training.save_weights_external("orig").result().path
        urls = tinker.RestClient(base_url=url, api_key=KEY_A).get_external_weights_urls(external).result().urls
        _download(urls, tmp_path / "adapter")
        service.close("success").result()
        return sampler, urls

    def sample_both(url: str, paths: tuple[str, str]) -> list[list[int]]:
        service = tinker.ServiceClient(base_url=url, api_key=KEY_A)
        prompt, params = types.ModelInput.from_ints(PROMPT[:3]), types.SamplingParams(max_tokens=6, seed=11)
        out = [service.create_sampling_client(model_path=p).result().sample(prompt, 1, params).result()
               .sequences[0].tokens for p in paths]
        service.close("success").result()
        return out

    async with running_stack(stack_settings, api_keys=API_KEYS) as url:
        sampler, download_urls = await in_thread(export, url)
        files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def start(name: str, key: str = KEY_A) -> dict:
                resp = await client.post("/api/v1/external_weights/upload_start", headers={"X-API-Key": key},
                                         json={"name": name, "base_model": base_model})
                assert resp.status_code == 200, resp.text
                return resp.json()

            async def finish(upload: dict, key: str = KEY_A) -> httpx.Response:
                return await client.post("/api/v1/external_weights/upload_finish", headers={"X-API-Key": key},
                                         json={"upload_id": upload["upload_id"]})

            upload = await start("imported")
            puts = [(await client.put(upload["urls"][f], content=files[f])).status_code for f in sorted(files)]
            by_bob = await finish(upload, KEY_B)
            done = await finish(upload)
            again = await finish(upload)  # finished: the upload is gone
            # A download URL never uploads; an upload URL only takes its own file; unknown models are refused.
            as_get = await client.put(next(iter(download_urls.values())), content=b"x")
            token_and_file = next(iter(download_urls.values())).split("/checkpoint_files/")[1]
            get_as_put = await client.put(f"/api/v1/checkpoint_uploads/{token_and_file}", content=b"x")
            partial = await start("partial")
            wrong_file = await client.put(upload["urls"]["adapter_config.json"].replace(
                "adapter_config.json", "adapter_model.safetensors"), content=b"x")
            await client.put(partial["urls"]["adapter_config.json"], content=files["adapter_config.json"])
            missing = await finish(partial)
            await client.put(partial["urls"]["adapter_model.safetensors"], content=b"\x10" + bytes(20))
            garbage = await finish(partial)
            unserved = await client.post("/api/v1/external_weights/upload_start", headers={"X-API-Key": KEY_A},
                                         json={"name": "x", "base_model": "no/such-model"})
        tokens = await in_thread(sample_both, url, (sampler, done.json()["tinker_path"]))
        info = await in_thread(lambda: tinker.RestClient(base_url=url, api_key=KEY_A).get_weights_info_by_tinker_path(
            done.json()["tinker_path"]).result())
    assert puts == [200, 200]
    assert by_bob.status_code == 404 and again.status_code == 404
    assert done.status_code == 200, done.text
    assert done.json()["tinker_path"] == upload["tinker_path"]
    assert upload["tinker_path"].endswith("/external_weights/imported")
    assert done.json()["size_bytes"] == sum(len(v) for v in files.values())
    assert tokens[0] == tokens[1]  # the uploaded adapter samples exactly like the run it came from
    assert info.base_model == base_model and info.lora_rank == 4
    assert as_get.status_code == 405 and get_as_put.status_code == 403
    assert wrong_file.status_code == 404
    assert missing.status_code == 400 and "adapter_model.safetensors was not uploaded" in missing.json()["detail"]
    assert garbage.status_code == 400 and "safetensors" in garbage.json()["detail"]
    assert unserved.status_code == 400 and unserved.json()["field"] == "base_model"
