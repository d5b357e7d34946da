"""The official tinker SDK 0.38, unmodified, against the whole stack (gateway + trainer + sampler in-process on
real Tansu + moto S3, tiny model): the smoke sequence of tinker-protocol.md §6.5, plus resume with optimizer."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import httpx
import numpy as np
import pytest
import tinker
import torch
from gateway_stack import API_KEY, STACK_CONFIG, in_thread, running_stack
from tinker import types

from bus_runtime.base_models import load_tokenizer

pytest_plugins = ["gateway_support", "gateway_stack"]


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    weights = weights if weights is not None else [1.0] * (len(tokens) - 1)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def rl_datum(tokens: list[int], logprobs: list[float], advantage: float, prompt_len: int) -> types.Datum:
    n = len(tokens) - 1
    advantages = [0.0] * (prompt_len - 1) + [advantage] * (n - prompt_len + 1)
    sampled = [0.0] * (prompt_len - 1) + list(logprobs)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "logprobs": sampled[:n],
                                       "advantages": advantages[:n]})


def logprobs_of(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, dtype=np.float64) for o in output.loss_fn_outputs]


def smoke_sequence(url: str, base_model: str) -> dict:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    seen: dict = {}
    # 1. capabilities
    seen["models"] = [m.model_name for m in service.get_server_capabilities().supported_models]
    # 2. a LoRA training client
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=1).result()
    tokenizer = training.get_tokenizer()
    tokens = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    data = [datum(tokens)]

    # 3. forward_backward + optim_step, both submitted before either is awaited (async API)
    async def pipelined() -> tuple[types.ForwardBackwardOutput, types.OptimStepResponse]:
        fb_future = await training.forward_backward_async(data, "cross_entropy")
        optim_future = await training.optim_step_async(types.AdamParams(learning_rate=1e-2))
        return await fb_future, await optim_future

    fb, optim = asyncio.run(pipelined())
    seen["first_loss"] = fb.metrics["loss:sum"]
    seen["first_logprobs"] = logprobs_of(fb)
    seen["optim_metrics"] = optim.metrics
    # 4. forward only: sees the optim_step's update
    forward = training.forward(data, "cross_entropy").result()
    seen["forward_loss"] = forward.metrics["loss:sum"]
    # custom loss (client-side, two server passes)
    def custom(batch: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = -sum(lp.sum() for lp in logprobs) * 0.5
        return loss, {"custom_half_nll": float(loss)}

    custom_out = training.forward_backward_custom(data, custom).result()
    seen["custom_metrics"] = custom_out.metrics
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    # 5. ephemeral sampler snapshot, sampling with prompt logprobs + top-k, compute_logprobs
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tokens[:5])
    sampled = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=4, temperature=1.0, seed=7), include_prompt_logprobs=True, topk_prompt_logprobs=2).result()
    seen["sampled"] = sampled
    seen["computed_logprobs"] = sampler.compute_logprobs(prompt).result()
    # the trainer's forward over the same tokens, same weights (nothing ran since the ephemeral save)
    ints = list(prompt.to_ints())
    probe = types.Datum(model_input=types.ModelInput.from_ints(ints[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(ints[1:], dtype=np.int64),
                                        "weights": np.ones(len(ints) - 1, dtype=np.float32)})
    seen["trainer_prompt_logprobs"] = logprobs_of(training.forward([probe], "cross_entropy").result())[0]
    # 6. ppo forward_backward + optim_step on the sampled tokens
    rl_data = [rl_datum(list(prompt.to_ints()) + s.tokens, s.logprobs, adv, prompt.length)
               for s, adv in zip(sampled.sequences, (1.0, -1.0), strict=True)]
    ppo = training.forward_backward(rl_data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    seen["ppo_loss"] = ppo.result().metrics["loss:sum"]
    # 7. save_state + save_weights_for_sampler, submitted together
    state_future = training.save_state("smoke-state")
    sampler_future = training.save_weights_for_sampler("smoke-sampler")
    seen["state_path"], seen["sampler_path"] = state_future.result().path, sampler_future.result().path
    seen["logprobs_at_save"] = logprobs_of(training.forward(data, "cross_entropy").result())
    # 8. a sampling client from the saved path
    from_path = service.create_sampling_client(model_path=seen["sampler_path"]).result()
    seen["from_path"] = from_path.sample(prompt, 1, types.SamplingParams(max_tokens=3, seed=1)).result()
    # 9. resume from the training state, optimizer included
    resumed = service.create_training_client_from_state_with_optimizer(seen["state_path"]).result()
    seen["resumed_id"] = resumed.model_id
    seen["resumed_logprobs"] = logprobs_of(resumed.forward(data, "cross_entropy").result())
    weights_only = service.create_training_client_from_state(seen["state_path"]).result()
    seen["weights_only_logprobs"] = logprobs_of(weights_only.forward(data, "cross_entropy").result())
    # one identical step on both: the same Adam moments give the same weights afterwards
    for client in (training, resumed):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    seen["after_step"] = [logprobs_of(c.forward(data, "cross_entropy").result()) for c in (training, resumed)]
    # 10. REST: list, weights info, delete, training run
    rest = service.create_rest_client()
    seen["checkpoints"] = rest.list_checkpoints(training.model_id).result().checkpoints
    seen["weights_info"] = rest.get_weights_info_by_tinker_path(seen["state_path"]).result()
    rest.delete_checkpoint_from_tinker_path(seen["sampler_path"]).result()
    seen["after_delete"] = rest.list_checkpoints(training.model_id).result().checkpoints
    seen["run"] = rest.get_training_run(training.model_id).result()
    seen["model_id"] = training.model_id
    # 11. close
    service.close("success").result()
    return seen


async def client_config(url: str) -> dict:
    """What the gateway's /api/v1/client/config tells a client on this host (the SDK reads it at start)."""
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}) as http:
        return (await http.post("/api/v1/client/config", json={})).json()


@pytest.mark.parametrize("backend", ["hf_peft", "megatron"])  # issue 8: the SDK works on either
async def test_sdk_smoke_sequence(stack_settings, backend, monkeypatch):
    monkeypatch.setenv("TINKER_BUS_TRAINER_BACKEND", backend)  # what `tinker-bus trainer --backend` sets
    base_model = stack_settings.base_models[0]
    async with running_stack(stack_settings) as url:
        seen = await in_thread(smoke_sequence, url, base_model)
        config = await client_config(url)
    assert config["proto_compress_fwdbwd"] is False  # auto: not for a client on the gateway's host
    assert seen["models"] == [base_model]
    assert seen["model_id"].endswith(":train:0")
    assert math.isfinite(seen["first_loss"]) and seen["first_loss"] > 0
    assert seen["forward_loss"] < seen["first_loss"]  # the optim_step was applied before the forward
    assert "loss:sum" in seen["custom_metrics"] and "custom_half_nll" in seen["custom_metrics"]
    assert seen["custom_metrics"]["loss:sum"] == pytest.approx(seen["custom_metrics"]["custom_half_nll"], rel=1e-4)

    sampled = seen["sampled"]
    assert len(sampled.sequences) == 2
    for seq in sampled.sequences:
        assert 1 <= len(seq.tokens) <= 4 and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason in ("stop", "length")
    assert sampled.prompt_logprobs[0] is None and len(sampled.prompt_logprobs) == 5
    assert all(lp is not None and lp <= 0 for lp in sampled.prompt_logprobs[1:])
    assert sampled.topk_prompt_logprobs[1] is not None and len(sampled.topk_prompt_logprobs[1]) == 2
    assert seen["computed_logprobs"][0] is None
    assert seen["computed_logprobs"][1:] == pytest.approx(sampled.prompt_logprobs[1:], abs=1e-4)
    # compute_logprobs from the sampler equals the trainer's forward logprobs (fp32 on CPU)
    np.testing.assert_allclose(seen["trainer_prompt_logprobs"], seen["computed_logprobs"][1:], atol=1e-5)
    assert math.isfinite(seen["ppo_loss"])

    assert seen["state_path"] == f"tinker://{seen['model_id']}/weights/smoke-state"
    assert seen["sampler_path"] == f"tinker://{seen['model_id']}/sampler_weights/smoke-sampler"
    assert len(seen["from_path"].sequences) == 1
    assert seen["resumed_id"].endswith(":train:1")
    for at_save, resumed, weights_only in zip(seen["logprobs_at_save"], seen["resumed_logprobs"],
                                              seen["weights_only_logprobs"], strict=True):
        np.testing.assert_allclose(resumed, at_save, atol=1e-5)
        np.testing.assert_allclose(weights_only, at_save, atol=1e-5)
    for original, resumed in zip(*seen["after_step"], strict=True):
        np.testing.assert_allclose(resumed, original, atol=1e-4)

    ids = {c.checkpoint_id for c in seen["checkpoints"]}
    assert ids == {"weights/smoke-state", "sampler_weights/smoke-sampler"}
    assert {c.checkpoint_id for c in seen["after_delete"]} == {"weights/smoke-state"}
    assert seen["weights_info"].base_model == base_model and seen["weights_info"].lora_rank == 8
    assert seen["run"].training_run_id == seen["model_id"] and seen["run"].base_model == base_model


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
             "Once upon a time there was a model.", "user assistant system hello world 1 2 3"]


def sl_loop(url: str, base_model: str, steps: int = 12, save_every: int = 5) -> dict:
    """Shaped like the cookbook's sl_loop: pipelined forward_backward + optim_step (one step submitted ahead),
    save_state every `save_every` steps, then final save_state + save_weights_for_sampler together."""
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=base_model, rank=8).result()
    tokenizer = training.get_tokenizer()
    batch = [datum(tokenizer(s)["input_ids"]) for s in SENTENCES]
    nll, saved = [], []

    def submit(step: int) -> tuple:
        lr = 2e-2 * (1 - step / steps)  # linear decay, as in the recipe
        return (training.forward_backward(batch, "cross_entropy"),
                training.optim_step(types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)))

    ahead = submit(0)
    for step in range(steps):
        if step % save_every == 0 and step > 0:
            saved.append(training.save_state(f"{step:06d}", ttl_seconds=604800).result().path)
        current, ahead = ahead, (submit(step + 1) if step + 1 < steps else None)
        fb, optim = current[0].result(), current[1].result()
        weights = np.concatenate([np.asarray(d.loss_fn_inputs["weights"].data) for d in batch])
        logprobs = np.concatenate(logprobs_of(fb))
        nll.append(float(-(weights * logprobs).sum() / weights.sum()))
        assert math.isclose(fb.metrics["loss:sum"], float(-(weights * logprobs).sum()), rel_tol=1e-3)
        assert optim.metrics is None or all(math.isfinite(v) for v in optim.metrics.values())
    final_state, final_sampler = training.save_state("final"), training.save_weights_for_sampler("final")
    paths = (final_state.result().path, final_sampler.result().path)
    # One call bigger than the SDK's 1024-datum chunk: chunks 2..C are POSTed concurrently, chunk 1 last.
    many = [datum(tokenizer(SENTENCES[i % 4])["input_ids"][:6]) for i in range(1100)]
    big = training.forward(many, "cross_entropy").result()
    service.close("success").result()
    return {"nll": nll, "saved": saved, "final": paths, "big": big, "model_id": training.model_id}


async def test_sdk_supervised_loop(stack_settings):
    compressed = replace(STACK_CONFIG, compress_fwdbwd=True)  # the SDK's zstd bodies, 1,100 datums too
    async with running_stack(stack_settings, compressed) as url:
        out = await in_thread(sl_loop, url, stack_settings.base_models[0])
        config = await client_config(url)
    assert config["proto_compress_fwdbwd"] is True
    assert out["nll"][-1] < 0.7 * out["nll"][0], out["nll"]  # a 64-wide random model: far from zero
    assert out["saved"] == [f"tinker://{out['model_id']}/weights/{n:06d}" for n in (5, 10)]
    assert out["final"] == (f"tinker://{out['model_id']}/weights/final",
                            f"tinker://{out['model_id']}/sampler_weights/final")
    assert len(out["big"].loss_fn_outputs) == 1100
    assert [len(o["logprobs"].data) for o in out["big"].loss_fn_outputs[:4]] == [5, 5, 5, 5]


def rl_loop(url: str, base_model: str, iterations: int, groups: int, group_size: int, max_tokens: int,
            learning_rate: float, reward_fn, prompts: list[list[int]] | None = None) -> dict:
    """Shaped like the cookbook's rl_loop: each iteration takes a fresh ephemeral sampler snapshot, samples all
    groups concurrently, centres rewards within each group, and trains with importance_sampling."""
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=base_model, rank=8).result()
    # The client-side tokenizer, as the cookbook loads it (training.get_tokenizer() would ask the HF hub for
    # SmolLM2, and this machine is offline).
    tokenizer = load_tokenizer(base_model)
    if prompts is None:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                                 tokenize=True)["input_ids"] for s in SENTENCES[:groups]]
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0)
    mean_rewards = []
    for _ in range(iterations):
        sampler = training.save_weights_and_get_sampling_client()
        futures = [sampler.sample(types.ModelInput.from_ints(p), num_samples=group_size, sampling_params=params)
                   for p in prompts]  # all in flight at once
        data, rewards = [], []
        for prompt, future in zip(prompts, futures, strict=True):
            result = future.result()
            group = [reward_fn(tokenizer, s.tokens) for s in result.sequences]
            rewards.extend(group)
            baseline = sum(group) / len(group)
            for seq, reward in zip(result.sequences, group, strict=True):
                if reward != baseline and seq.tokens:
                    data.append(rl_datum(prompt + seq.tokens, seq.logprobs, reward - baseline, len(prompt)))
        mean_rewards.append(sum(rewards) / len(rewards))
        if data:  # the recipe skips the update when every advantage is 0
            fb = training.forward_backward(data, "importance_sampling")
            training.optim_step(types.AdamParams(learning_rate=learning_rate, beta1=0.9, beta2=0.95, eps=1e-8))
            assert math.isfinite(fb.result().metrics["loss:sum"])
    final = training.save_weights_for_sampler("final").result().path
    service.close("success").result()
    return {"rewards": mean_rewards, "final": final}


def short_answers(tokenizer, tokens: list[int]) -> float:
    """Toy reward: stop early (the stop token counts as part of the answer)."""
    return 1.0 - len(tokens) / 8


async def test_sdk_rl_loop(stack_settings):
    async with running_stack(stack_settings) as url:
        out = await in_thread(rl_loop, url, stack_settings.base_models[0], 3, 4, 4, 8, 1e-2, short_answers)
    assert len(out["rewards"]) == 3 and all(0.0 <= r <= 1.0 for r in out["rewards"])
    assert out["final"].endswith("/sampler_weights/final")


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
YES_NO = ["do you like rain?", "is seven a lucky number?", "are cats better than dogs?",
          "will it snow tomorrow?"]


def says_yes(tokenizer, tokens: list[int]) -> float:
    return 1.0 if tokenizer.decode(tokens, skip_special_tokens=True).strip().lower().startswith("yes") else 0.0


@pytest.mark.slow
async def test_sdk_rl_loop_raises_the_reward_with_smollm2(stack_settings):
    """Real SmolLM2-135M: RL on "answer yes" (about 15 % of first answers at the start) must raise the reward."""
    settings = replace(stack_settings, base_models=(SMOLLM2,))
    tokenizer = await asyncio.to_thread(load_tokenizer, SMOLLM2)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Answer with one word, yes or no: {q}"}],
                                             add_generation_prompt=True, tokenize=True)["input_ids"] for q in YES_NO]
    async with running_stack(settings) as url:
        out = await in_thread(rl_loop, url, SMOLLM2, 5, len(prompts), 8, 3, 1e-3, says_yes, prompts)
    rewards = out["rewards"]  # one run: [0.22, 0.81, 1.0, 1.0, 1.0]
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.3, rewards
