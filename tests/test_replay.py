"""`tinker-bus replay` / `export-log` against a real broker and S3: a finished supervised run and an RL run (the
real sampler samples, importance_sampling trains on it) rebuilt from the log give the live checkpoints' sha256."""

from __future__ import annotations

import asyncio
import json

import msgspec
import numpy as np
import pytest
from recovery_support import BusClient, fresh_settings, sampler_sha, supervised_events, trainers
from safetensors.torch import load_file
from trainer_support import adam, fb

from artifact_store import CheckpointStore, TinkerPath
from bus_events import EventType, encode_event, make_event, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.settings import BusSettings, open_object_store
from bus_runtime.testing import make_tiny_model
from sampler_consumer.worker import run_sampler
from tinker_bus import cli as tinker_bus_cli
from trainer_consumer.replay.fingerprint import adapter_sha256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def bus_flags(settings: BusSettings) -> list[str]:
    return ["--kafka-bootstrap", settings.kafka_bootstrap, "--s3-endpoint", settings.s3_endpoint,
            "--s3-access-key", settings.s3_access_key, "--s3-secret-key", settings.s3_secret_key,
            "--bucket", settings.bucket, "--topic-prefix", settings.topics.prefix]


async def cli(*argv: str) -> int:
    """`tinker-bus <argv>` in a thread (the commands run their own event loop)."""
    return await asyncio.to_thread(tinker_bus_cli.main, list(argv))


async def test_a_finished_supervised_run_replays_to_the_live_checkpoints(settings, tiny, tmp_path):
    s = fresh_settings(settings, "sup", base_models=(tiny,))
    model = "sess:train:0"
    events = supervised_events(tiny, seed=3, steps=20)
    halfway = 1 + 2 * 10  # after the 10th optim_step: a training-state save, then the rest of the run
    events.insert(halfway, (EventType.SAVE_WEIGHTS, p.SaveWeights(name="step-10"), halfway))
    events = [(kind, payload, seq) for seq, (kind, payload, _) in enumerate(events)]
    async with trainers(s), BusClient(s) as client:
        ids = await client.drive(model, events)
    live_final = sampler_sha(s, model)

    out = tmp_path / "full"
    assert await cli("replay", "--model-id", model, "--out", str(out), *bus_flags(s)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps_applied"] == 20 and report["final"]["step"] == 20
    assert report["events_applied"] == len(events) and report["from_snapshot"] is None
    assert report["final"]["sha256"] == live_final
    assert adapter_sha256(load_file(out / "adapter_model.safetensors")) == live_final  # the PEFT file written
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    saves = {c["path"]: c for c in report["checkpoints"]}
    assert saves[f"tinker://{model}/sampler_weights/final"]["match"] is True
    assert saves[f"tinker://{model}/weights/step-10"] == {**saves[f"tinker://{model}/weights/step-10"],
                                                          "step": 10, "match": True}
    # Per-step losses: the live replies' exactly (every reply of the run was compared, all identical).
    assert report["live_replies"] == {"compared": len(events), "identical": len(events), "differing": [],
                                      "without_live_reply": 0}
    live_losses = [r["result"]["metrics"]["loss:sum"] for r in client.result_values(ids)
                   if r["request_type"] == "forward_backward"]
    assert [step["loss:sum"] for step in report["steps"]] == live_losses
    assert all("grad_norm" in step["optim"] for step in report["steps"])

    # Up to the step-10 save: the weights of that training-state checkpoint.
    out10 = tmp_path / "until"
    assert await cli("replay", "--model-id", model, "--until-seq", str(halfway), "--out", str(out10),
                     *bus_flags(s)) == 0
    until = json.loads((out10 / "report.json").read_text())
    step10 = adapter_sha256(CheckpointStore(open_object_store(s)).load(
        TinkerPath(model, "weights", "step-10")).adapter_weights)
    assert until["final"]["step"] == 10 and until["final"]["sha256"] == step10
    assert [c["match"] for c in until["final"]["live"]] == [True]

    # From the live auto-snapshot (taken at step 20): only what came after it is applied.
    out_snap = tmp_path / "snap"
    assert await cli("replay", "--model-id", model, "--from-snapshot", "--out", str(out_snap), *bus_flags(s)) == 0
    snap = json.loads((out_snap / "report.json").read_text())
    assert snap["from_snapshot"]["seq_id"] >= halfway and snap["steps_applied"] < 10
    assert snap["final"]["sha256"] == live_final


async def test_an_rl_run_exported_to_a_file_replays_on_its_own(settings, tiny, tmp_path):
    """sample (real sampler, ephemeral sampler weights) -> importance_sampling forward_backward -> optim_step."""
    s = fresh_settings(settings, "rl", base_models=(tiny,))
    model, prompt = "rl:train:0", [5, 17, 33, 2, 9]
    async with trainers(s), BusClient(s) as client:
        sampler_ready = asyncio.Event()
        sampler = asyncio.create_task(run_sampler(s, ready=sampler_ready))
        try:
            await asyncio.wait_for(sampler_ready.wait(), 60)
            seq = 0
            ids = [await client.publish(model, (EventType.CREATE_MODEL,
                                                p.CreateModel(base_model=tiny, lora=p.LoraSpec(rank=4, seed=9)), 0))]
            for iteration in range(3):
                session = f"rl:sample:{iteration}"
                seq += 1
                saved = await client.result(await client.publish(model, (
                    EventType.SAVE_WEIGHTS_FOR_SAMPLER, p.SaveWeightsForSampler(sampling_session_id=session), seq)))
                assert saved.error is None, saved.error
                sampled = await _sample(client, s, session, prompt, seed=iteration)
                rl_data = [_rl_datum(prompt, seq_.tokens.numpy(), seq_.logprobs.numpy(), advantage)
                           for seq_, advantage in zip(sampled.sequences, (1.0, -1.0, 0.5), strict=True)]
                seq += 2
                ids += await client.drive(model, [
                    (EventType.FORWARD_BACKWARD, fb(rl_data, loss_fn="importance_sampling"), seq - 1),
                    (EventType.OPTIM_STEP, adam(lr=0.05), seq)])
            ids += await client.drive(model, [(EventType.SAVE_WEIGHTS_FOR_SAMPLER,
                                               p.SaveWeightsForSampler(name="final"), seq + 1)])
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    live_final = sampler_sha(s, model)

    log_file = tmp_path / "rl.tblog"
    assert await cli("export-log", "--model-id", model, "--out", str(log_file), *bus_flags(s)) == 0
    out = tmp_path / "replay"
    assert await cli("replay", "--model-id", model, "--from-file", str(log_file), "--out", str(out),
                     *bus_flags(s)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["kind"] == "file" and report["steps_applied"] == 3
    assert report["final"]["sha256"] == live_final
    matches = {c["path"].rsplit("/", 1)[1]: c["match"] for c in report["checkpoints"]}
    assert matches == {"ephemeral-1": True, "ephemeral-4": True, "ephemeral-7": True, "final": True}
    assert report["live_replies"]["compared"] == 11 and not report["live_replies"]["differing"]
    assert [s_["loss:sum"] != 0 for s_ in report["steps"]] == [True, True, True]

    # The file alone, no S3: the same weights.
    offline = tmp_path / "offline"
    assert await cli("replay", "--model-id", model, "--from-file", str(log_file), "--offline", "--out",
                     str(offline), *bus_flags(s)) == 0
    assert json.loads((offline / "report.json").read_text())["final"]["sha256"] == live_final


async def _sample(client: BusClient, s: BusSettings, session: str, prompt: list[int], seed: int) -> p.SampleResult:
    request = p.Sample(sampling_session_id=session, prompt=tensor_from_numpy(np.asarray(prompt, np.int32)),
                       num_samples=3, sampling_params=p.SamplingParams(max_tokens=6, temperature=1.0, seed=seed,
                                                                       stop=[]))
    env, body = make_event(EventType.SAMPLE, request, model_id=session)
    await client.producer.send_and_wait(s.topics.sample, encode_event(env, body), key=session.encode())
    result = await client.result(env.request_id)
    assert result.error is None, result.error
    return msgspec.convert(result.result, p.SampleResult)


def _rl_datum(prompt: list[int], completion: np.ndarray, logprobs: np.ndarray, advantage: float) -> p.Datum:
    tokens = np.concatenate([prompt, completion]).astype(np.int64)
    n, head = len(tokens) - 1, len(prompt) - 1
    sampled = np.concatenate([np.zeros(head), logprobs])[:n]
    advantages = np.concatenate([np.zeros(head), np.full(len(completion), advantage)])[:n]
    return p.Datum(tokens=tensor_from_numpy(tokens[:-1], "int32"),
                   loss_fn_inputs={"target_tokens": tensor_from_numpy(tokens[1:], "int64"),
                                   "logprobs": tensor_from_numpy(sampled, "float32"),
                                   "advantages": tensor_from_numpy(advantages, "float32")})
