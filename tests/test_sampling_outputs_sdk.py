"""Issue 16.2 through the official SDK 0.38, unmodified, against the whole stack (gateway + trainer + sampler on real
Tansu + moto S3, tiny model): top-k logprobs of sampled tokens, target_prompt_logprobs (dense and sparse CSR),
prompt_alt_tokens, prompt_cache_hit_tokens, and kind="inflight" sampling clients."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types

pytest_plugins = ["gateway_support", "gateway_stack"]

PROMPT = list(range(5, 45))  # 40 tokens: two full KV pages of 16 for the prefix cache
ROWS = len(PROMPT) - 1


def _outputs(url: str, base_model: str) -> dict:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    client = service.create_sampling_client(base_model=base_model).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    seen: dict = {}
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3, stop=[])
    seen["first"] = client.sample(prompt, 2, params, topk_sample_logprobs=3).result()
    seen["again"] = client.sample(prompt, 2, params).result()
    ids = torch.full((ROWS, 2), -1, dtype=torch.int64)
    ids[:, 0] = torch.tensor(PROMPT[1:])
    ids[10, 1] = 3
    one = types.SamplingParams(max_tokens=1)
    seen["dense"] = client.sample(prompt, 1, one, include_prompt_logprobs=True,
                                  target_prompt_logprobs=types.TensorData.from_torch(ids)).result()
    few = torch.full((ROWS, 4), -1, dtype=torch.int64)  # sparse enough that the SDK sends it as CSR
    few[5, 2], few[10, 0], few[30, 3] = PROMPT[6], 3, PROMPT[31]
    seen["sparse"] = client.sample(prompt, 1, one, target_prompt_logprobs=types.TensorData.from_torch_sparse(
        few, pad_value=-1)).result()
    seen["alt"] = client.sample(prompt, 1, types.SamplingParams(max_tokens=1, temperature=1.0, seed=5),
                                prompt_alt_tokens_k=4).result()
    drawn = torch.tensor(np.asarray(seen["alt"].prompt_alt_tokens.tokens.data), dtype=torch.int64).view(ROWS, 4)
    seen["drawn_scored"] = client.sample(prompt, 1, one,
                                         target_prompt_logprobs=types.TensorData.from_torch(drawn)).result()
    try:
        client.sample(prompt, 1, one, target_prompt_logprobs=types.TensorData.from_torch(ids[:5])).result()
    except tinker.BadRequestError as exc:
        seen["bad_shape"] = str(exc)
    return seen


async def test_sampling_outputs_through_the_sdk(stack_settings):
    async with running_stack(stack_settings) as url:
        seen = await in_thread(_outputs, url, stack_settings.base_models[0])

    first, again = seen["first"], seen["again"]
    for seq in first.sequences:
        assert len(seq.topk_logprobs) == len(seq.tokens) == 4
        for token, logprob, top in zip(seq.tokens, seq.logprobs, seq.topk_logprobs, strict=True):
            assert len(top) == 3 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert top[0][1] >= logprob - 1e-6
            assert all(lp == pytest.approx(logprob, abs=1e-6) for t, lp in top if t == token)
    assert all(seq.topk_logprobs is None for seq in again.sequences)  # opt-in per request
    assert first.prompt_cache_hit_tokens == 0 and again.prompt_cache_hit_tokens == 32
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]  # cached KV, same samples

    dense = seen["dense"]
    target = dense.target_prompt_logprobs
    assert target.dtype == "float32" and target.shape == [ROWS, 2] and target.sparse_crow_indices is None
    scored = target.to_numpy()
    np.testing.assert_allclose(scored[:, 0], np.asarray(dense.prompt_logprobs[1:], dtype=np.float32), atol=1e-6)
    assert scored[10, 1] < 0 and (np.delete(scored[:, 1], 10) == 0.0).all()  # 0.0 where the request had -1
    sparse = seen["sparse"].target_prompt_logprobs
    assert sparse.sparse_crow_indices is not None and len(sparse.data) == 3  # only the cells asked for
    expected = np.zeros((ROWS, 4), dtype=np.float32)
    expected[5, 2], expected[10, 0], expected[30, 3] = scored[5, 0], scored[10, 1], scored[30, 0]
    np.testing.assert_allclose(sparse.to_numpy(), expected, atol=1e-6)
    assert seen["sparse"].prompt_logprobs is None

    alt = seen["alt"].prompt_alt_tokens
    assert alt.tokens.dtype == "int64" and alt.tokens.shape == alt.logprobs.shape == [ROWS, 4]
    np.testing.assert_allclose(alt.logprobs.to_numpy(), seen["drawn_scored"].target_prompt_logprobs.to_numpy(),
                               atol=1e-6)
    assert "target_prompt_logprobs" in seen["bad_shape"] and "[39, K >= 1]" in seen["bad_shape"]


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def _inflight(url: str, base_model: str) -> dict:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=base_model, rank=8, seed=1).result()
    prompt = types.ModelInput.from_ints(PROMPT[:12])
    snapshot = training.save_weights_and_get_sampling_client().result()
    early = training.save_weights_and_get_sampling_client(kind="inflight").result()
    seen = {"before": early.compute_logprobs(prompt).result()}
    for _ in range(3):
        training.forward_backward([_datum(PROMPT[:12])], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    late = training.save_weights_and_get_sampling_client(kind="inflight").result()
    seen["early_after"] = early.compute_logprobs(prompt).result()
    seen["late"] = late.compute_logprobs(prompt).result()
    seen["snapshot"] = snapshot.compute_logprobs(prompt).result()
    rest = tinker.RestClient(base_url=url, api_key=API_KEY)
    # The sampling session id each client sends (the SDK keeps it private): the session names its weights.
    sessions = [c._sampling_session_id for c in (early, late, snapshot)]
    seen["paths"] = [rest.get_sampler(session).result().model_path for session in sessions]
    seen["model_id"] = training.model_id
    return seen


async def test_inflight_sampling_clients_follow_the_latest_inflight_save(stack_settings):
    async with running_stack(stack_settings) as url:
        seen = await in_thread(_inflight, url, stack_settings.base_models[0])
    before, early_after, late = (np.asarray(seen[k][1:]) for k in ("before", "early_after", "late"))
    assert not np.allclose(before, late, atol=1e-4)  # training moved the weights
    np.testing.assert_array_equal(early_after, late)  # the earlier inflight client now samples the newest weights
    np.testing.assert_array_equal(np.asarray(seen["snapshot"][1:]), before)  # a snapshot stays where it was
    inflight_path = f"tinker://{seen['model_id']}/sampler_weights/inflight"
    assert seen["paths"][:2] == [inflight_path, inflight_path] and seen["paths"][2] != inflight_path
