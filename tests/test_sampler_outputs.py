"""The opt-in sampling outputs of SDK 0.38 on the engine (tiny random Llama, fp32 CPU): top-k logprobs at sampled
positions, target_prompt_logprobs, prompt_alt_tokens and prompt_cache_hit_tokens. Every logprob equals a
teacher-forcing pass of the reference model (1e-5), as tests/test_sampler_engine.py checks sampled logprobs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from bus_events import payloads as p
from sampler_consumer.config import SamplerConfig
from sampler_consumer.engine import Engine, GenerationFailed, GenOutput, GenRequest

pytest_plugins = ["sampler_support"]  # tiny_dir, base

PROMPT = [5, 17, 42, 99, 7, 133, 64, 3, 201]
PAGE = 4  # a small page so a 9-token prompt has 2 full pages to find in the prefix cache


@pytest.fixture(scope="module")
def engine(base):
    engine = Engine(base, SamplerConfig(page_size=PAGE, prompt_logprob_chunk=3))  # chunks split the prompt
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _one(engine: Engine, request: GenRequest) -> GenOutput:
    return engine.generate([request])[0]


def _log_softmax(reference, tokens: list[int]) -> torch.Tensor:
    """Teacher forcing: [len(tokens), V] log p(next | tokens[:i + 1])."""
    with torch.no_grad():
        return torch.log_softmax(reference(input_ids=torch.tensor([tokens])).logits[0], dim=-1)


def test_topk_sample_logprobs_are_the_teacher_forced_top_k_at_every_sampled_position(engine, reference):
    k = 5
    out = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=8, temperature=1.0, seed=4, stop=[]),
                                  num_samples=3, topk_sample_logprobs=k))
    for seq in out.sequences:
        assert len(seq.topk) == len(seq.tokens) == 8
        forced = _log_softmax(reference, PROMPT + seq.tokens)[len(PROMPT) - 1:-1]  # [8, V]
        ids = np.stack([i for i, _ in seq.topk])
        values = np.stack([v for _, v in seq.topk])
        assert ids.shape == values.shape == (8, k) and ids.dtype == np.int32 and values.dtype == np.float32
        expected_values, expected_ids = forced.topk(k, dim=-1)
        np.testing.assert_array_equal(ids, expected_ids.numpy())
        np.testing.assert_allclose(values, expected_values.numpy(), atol=1e-5, rtol=0)
        # A sampled token inside its top k has exactly its sampled logprob there.
        for step, token in enumerate(seq.tokens):
            hit = np.flatnonzero(ids[step] == token)
            if hit.size:
                assert values[step, hit[0]] == np.float32(seq.logprobs[step])


def test_rows_without_topk_sample_logprobs_batched_with_rows_that_ask_are_unchanged(engine):
    params = p.SamplingParams(max_tokens=6, temperature=0.9, seed=12, stop=[])
    alone = _one(engine, GenRequest(PROMPT, params))
    plain, asking = engine.generate([GenRequest(PROMPT, params),
                                     GenRequest(PROMPT[:5], params, topk_sample_logprobs=2)])
    assert plain.sequences[0].tokens == alone.sequences[0].tokens and plain.sequences[0].topk == []
    assert len(asking.sequences[0].topk) == 6 and all(i.shape == (2,) for i, _ in asking.sequences[0].topk)


def test_target_prompt_logprobs_score_the_named_ids_and_nan_elsewhere(engine, reference):
    rows = len(PROMPT) - 1
    ids = np.full((rows, 3), -1, dtype=np.int64)
    ids[:, 0] = PROMPT[1:]  # column 0: the prompt's own tokens (= prompt logprobs)
    ids[2, 1], ids[5, 2], ids[7, 1] = 11, 250, 0
    out = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=1), prompt_logprobs=True,
                                  target_prompt_ids=ids))
    forced = _log_softmax(reference, PROMPT)[:-1]  # row i predicts PROMPT[i + 1]
    got = out.target_logprobs
    assert got.shape == (rows, 3) and got.dtype == np.float32
    asked = ids >= 0
    assert np.isnan(got[~asked]).all() and not np.isnan(got[asked]).any()
    expected = forced.gather(1, torch.from_numpy(np.where(asked, ids, 0))).numpy()
    np.testing.assert_allclose(got[asked], expected[asked], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[:, 0], out.prompt_logprobs[1:])


def test_prompt_alt_tokens_are_seeded_draws_with_their_model_logprobs(engine, reference):
    k, rows = 4, len(PROMPT) - 1
    params = p.SamplingParams(max_tokens=1, temperature=1.0, seed=9)
    out = _one(engine, GenRequest(PROMPT, params, prompt_alt_tokens_k=k))
    assert out.alt_tokens.shape == out.alt_logprobs.shape == (rows, k)
    assert out.alt_tokens.dtype == np.int32 and out.alt_logprobs.dtype == np.float32
    forced = _log_softmax(reference, PROMPT)[:-1]
    np.testing.assert_allclose(out.alt_logprobs, forced.gather(1, torch.from_numpy(out.alt_tokens).long()).numpy(),
                               atol=1e-5, rtol=0)
    again = _one(engine, GenRequest(PROMPT, params, prompt_alt_tokens_k=k))
    np.testing.assert_array_equal(again.alt_tokens, out.alt_tokens)  # same seed, same draws
    assert len(np.unique(out.alt_tokens)) > k  # draws, not one token repeated
    unchunked = Engine(engine.base, SamplerConfig(page_size=PAGE))
    try:  # the draws depend on the seed and the position, not on how the prompt pass is chunked
        np.testing.assert_array_equal(_one(unchunked, GenRequest(PROMPT, params, prompt_alt_tokens_k=k)).alt_tokens,
                                      out.alt_tokens)
    finally:
        unchunked.close()
    other_seed = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=1, temperature=1.0, seed=10),
                                         prompt_alt_tokens_k=k))
    assert not np.array_equal(other_seed.alt_tokens, out.alt_tokens)
    greedy = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=1, temperature=0.0), prompt_alt_tokens_k=2))
    np.testing.assert_array_equal(greedy.alt_tokens, forced.argmax(-1, keepdim=True).expand(-1, 2).numpy())


def test_extras_of_two_identical_prompts_batched_together_stay_their_own(engine):
    ids_a = np.full((len(PROMPT) - 1, 1), 3, dtype=np.int64)
    ids_b = np.full((len(PROMPT) - 1, 1), 8, dtype=np.int64)
    params = p.SamplingParams(max_tokens=2, temperature=1.0, seed=1, stop=[])
    a, b, alt = engine.generate([GenRequest(PROMPT, params, target_prompt_ids=ids_a),
                                 GenRequest(PROMPT, params, target_prompt_ids=ids_b),
                                 GenRequest(PROMPT, params, prompt_alt_tokens_k=2)])
    alone_b = _one(engine, GenRequest(PROMPT, params, target_prompt_ids=ids_b))
    np.testing.assert_array_equal(b.target_logprobs, alone_b.target_logprobs)
    assert not np.array_equal(a.target_logprobs, b.target_logprobs)
    assert a.alt_tokens is None and alt.target_logprobs is None and alt.alt_tokens.shape == (len(PROMPT) - 1, 2)
    assert a.sequences[0].tokens == b.sequences[0].tokens == alone_b.sequences[0].tokens


def test_prompt_cache_hit_tokens_count_the_cached_full_pages(base):
    engine = Engine(base, SamplerConfig(page_size=PAGE))  # a fresh prefix cache
    params = p.SamplingParams(max_tokens=2, temperature=0.0, stop=[])
    try:
        first = _one(engine, GenRequest(PROMPT, params, num_samples=3))
        again = _one(engine, GenRequest(PROMPT, params, num_samples=3))
        longer = _one(engine, GenRequest([*PROMPT, 77, 78, 79], params))
        other_tenant = _one(engine, GenRequest(PROMPT, params, cache_namespace="someone-else"))
        with_logprobs = _one(engine, GenRequest(PROMPT, params, prompt_logprobs=True))
    finally:
        engine.close()
    assert first.prompt_cache_hit_tokens == 0
    # 9 tokens = 2 full pages of 4 + 1; the last token is always computed (it gives the logits).
    assert again.prompt_cache_hit_tokens == 8 and longer.prompt_cache_hit_tokens == 8
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
    assert other_tenant.prompt_cache_hit_tokens == 0  # prefix-cache entries are per tenant
    assert with_logprobs.prompt_cache_hit_tokens == 0  # scored over the whole prompt, nothing cached is used


@pytest.mark.parametrize("request_kwargs, message", [
    ({"topk_sample_logprobs": 10_000}, "topk_sample_logprobs must be in"),
    ({"target_prompt_ids": np.full((len(PROMPT) - 1, 1), 10_000)}, "target_prompt_logprobs ids"),
    ({"target_prompt_ids": np.full((len(PROMPT) - 1, 1), -1)}, "names no token id"),
    ({"target_prompt_ids": np.zeros((3, 1), dtype=np.int64)}, "must be [len(prompt) - 1, K]"),
])
def test_bad_output_options_fail_their_request_with_a_message_naming_the_field(engine, request_kwargs, message):
    with pytest.raises(GenerationFailed, match=re.escape(message)):
        _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=1), **request_kwargs))


def test_a_one_token_prompt_has_empty_extras(engine):
    out = _one(engine, GenRequest(PROMPT[:1], p.SamplingParams(max_tokens=1), prompt_alt_tokens_k=3))
    assert out.alt_tokens.shape == out.alt_logprobs.shape == (0, 3) and len(out.sequences[0].tokens) == 1
