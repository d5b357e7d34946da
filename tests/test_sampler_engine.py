"""The generation engine on a tiny random Llama: seeds, stops, num_samples, top-k/p, batching, prompt logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampler_support import train_peft_adapter
from transformers import AutoModelForCausalLM

from bus_events import payloads as p
from bus_events.payloads import TOPK_PAD_ID, TOPK_PAD_LOGPROB
from sampler_consumer.config import SamplerConfig
from sampler_consumer.engine import Engine, GenOutput, GenRequest

pytest_plugins = ["sampler_support"]  # tiny_dir, base

PROMPT = [5, 17, 42, 99, 7, 133]
OTHER_PROMPT = [250, 12, 64, 3, 201, 88, 19, 77, 140]
GREEDY = p.SamplingParams(max_tokens=16, temperature=0.0, stop=[])
SEEDED = {"max_tokens": 16, "temperature": 1.0, "seed": 21}  # a free run with varied tokens to stop in


@pytest.fixture(scope="module")
def engine(base):
    engine = Engine(base)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def adapters(tiny_dir, base):
    return [base.lora.parse(train_peft_adapter(tiny_dir, seed=seed, rank=rank),
                            (f"tinker://r:train:0/sampler_weights/a{seed}", "v"))
            for seed, rank in ((1, 4), (2, 8))]


def _one(engine: Engine, request: GenRequest) -> GenOutput:
    return engine.generate([request])[0]


def _tokens(out: GenOutput) -> list[list[int]]:
    return [s.tokens for s in out.sequences]


def _free_run(engine: Engine) -> list[int]:
    tokens = _one(engine, GenRequest(PROMPT, p.SamplingParams(**SEEDED, stop=[]))).sequences[0].tokens
    assert len(tokens) == 16
    return tokens


def _first_new_token_index(tokens: list[int]) -> int:
    return next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])


# ----------------------------------------------------------------------------- seeds and num_samples


def test_same_seed_same_tokens_and_num_samples_differ(engine):
    params = p.SamplingParams(max_tokens=12, temperature=1.0, seed=7, stop=[])
    first = _one(engine, GenRequest(PROMPT, params, num_samples=4))
    again = _one(engine, GenRequest(PROMPT, params, num_samples=4))
    assert len(first.sequences) == 4 and _tokens(first) == _tokens(again)
    assert len({tuple(t) for t in _tokens(first)}) == 4  # every sample has its own stream
    other_seed = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=12, temperature=1.0, seed=8, stop=[]),
                                         num_samples=4))
    assert _tokens(other_seed) != _tokens(first)
    unseeded = p.SamplingParams(max_tokens=12, temperature=1.0, stop=[])
    assert _tokens(_one(engine, GenRequest(PROMPT, unseeded))) != _tokens(_one(engine, GenRequest(PROMPT, unseeded)))


def test_seeded_rows_keep_their_tokens_when_batched_with_others(engine, adapters):
    target = GenRequest(PROMPT, p.SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, stop=[]),
                        adapter=adapters[0], num_samples=2)
    alone = _one(engine, target)
    neighbours = [
        GenRequest(OTHER_PROMPT, p.SamplingParams(max_tokens=5, temperature=1.0, top_k=5, seed=3, stop=[]),
                   adapter=adapters[1], num_samples=3),
        GenRequest(OTHER_PROMPT[:2], p.SamplingParams(max_tokens=20, temperature=1.3, stop=[])),
    ]
    batched = engine.generate([neighbours[0], target, neighbours[1]])[1]
    assert _tokens(batched) == _tokens(alone)
    for a, b in zip(alone.sequences, batched.sequences, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_batched_rows_with_different_adapters_match_unbatched(engine, adapters):
    requests = [GenRequest(PROMPT, GREEDY, adapter=adapters[0], prompt_logprobs=True),
                GenRequest(OTHER_PROMPT, GREEDY, adapter=adapters[1], prompt_logprobs=True),
                GenRequest(PROMPT[:4], GREEDY, adapter=None, prompt_logprobs=True),
                GenRequest(OTHER_PROMPT, GREEDY, adapter=adapters[0], prompt_logprobs=True)]
    batched = engine.generate(requests)
    singles = [_one(engine, r) for r in requests]
    assert len({tuple(out.sequences[0].tokens) for out in singles}) == 4  # the adapters change the outputs
    for one, many in zip(singles, batched, strict=True):
        assert one.sequences[0].tokens == many.sequences[0].tokens
        np.testing.assert_allclose(one.sequences[0].logprobs, many.sequences[0].logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(one.prompt_logprobs, many.prompt_logprobs, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- stops and lengths


def test_stop_token_id_is_returned_once_at_the_end(engine):
    free = _free_run(engine)
    i = _first_new_token_index(free)
    out = _one(engine, GenRequest(PROMPT, p.SamplingParams(**SEEDED, stop=[free[i]])))
    [seq] = out.sequences
    assert seq.tokens == free[:i + 1] and seq.stop_reason == "stop" and seq.tokens.count(free[i]) == 1
    assert len(seq.logprobs) == len(seq.tokens)


def test_stop_string_ends_on_the_token_that_completes_it(engine, base):
    free = _free_run(engine)
    for i in range(1, len(free)):
        before, upto = base.decode(free[:i]), base.decode(free[:i + 1])
        stop = upto[len(before):] if upto.startswith(before) else ""
        if stop and stop not in before and "\ufffd" not in stop:  # text this token completed, seen first here
            break
    else:
        pytest.fail("no usable stop string in the free run")
    out = _one(engine, GenRequest(PROMPT, p.SamplingParams(**SEEDED, stop=[99999, stop])))
    [seq] = out.sequences
    assert seq.tokens == free[:i + 1] and seq.stop_reason == "stop"


def test_eos_stops_only_when_stop_is_none(engine, base):
    free = _free_run(engine)
    i = _first_new_token_index(free)
    saved = base.eos_ids
    base.eos_ids = frozenset({free[i]})  # pretend the model's EOS is a token the free run produces
    try:
        [eos_run] = _one(engine, GenRequest(PROMPT, p.SamplingParams(**SEEDED))).sequences
        [never] = _one(engine, GenRequest(PROMPT, p.SamplingParams(**SEEDED, stop=[]))).sequences
    finally:
        base.eos_ids = saved
    assert (eos_run.tokens, eos_run.stop_reason) == (free[:i + 1], "stop")
    assert (never.tokens, never.stop_reason) == (free, "length")


def test_max_tokens_gives_length_and_zero_gives_nothing(engine):
    out = engine.generate([GenRequest(PROMPT, p.SamplingParams(max_tokens=5, temperature=1.0, seed=1, stop=[]),
                                      num_samples=2),
                           GenRequest(PROMPT, p.SamplingParams(max_tokens=0), prompt_logprobs=True)])
    assert [(len(s.tokens), s.stop_reason) for s in out[0].sequences] == [(5, "length"), (5, "length")]
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in out[1].sequences] == [([], [], "length")]
    assert out[1].prompt_logprobs is not None


# ----------------------------------------------------------------------------- truncation and logprobs


def test_top_k_one_and_tiny_top_p_are_greedy_and_top_k_stays_in_the_top_k(engine, tiny_dir):
    greedy = _one(engine, GenRequest(PROMPT, GREEDY)).sequences[0].tokens
    for params in (p.SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=3, stop=[]),
                   p.SamplingParams(max_tokens=16, temperature=1.0, top_p=1e-6, seed=3, stop=[])):
        assert _one(engine, GenRequest(PROMPT, params)).sequences[0].tokens == greedy
    top3 = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=16, temperature=5.0, top_k=3, seed=3,
                                                             stop=[]), num_samples=4))
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for seq in top3.sequences:
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([PROMPT + seq.tokens])).logits[0, len(PROMPT) - 1:-1]
        allowed = logits.topk(3, dim=-1).indices
        assert all(t in allowed[j] for j, t in enumerate(seq.tokens))
        # The reported logprob is the model's own (temperature 1, untruncated).
        np.testing.assert_allclose(
            seq.logprobs, torch.log_softmax(logits, -1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0],
            atol=1e-5, rtol=0)


def test_prompt_logprobs_and_topk_layout(base, engine):
    out = _one(engine, GenRequest(PROMPT, p.SamplingParams(max_tokens=1), prompt_logprobs=True,
                                  topk_prompt_logprobs=3))
    lps, ids, top = out.prompt_logprobs, out.topk_ids, out.topk_logprobs
    assert lps.dtype == np.float32 and lps.shape == (len(PROMPT),) and math.isnan(lps[0])
    assert ids.shape == top.shape == (len(PROMPT), 3) and ids.dtype == np.int32
    assert (ids[0] == TOPK_PAD_ID).all() and (top[0] == TOPK_PAD_LOGPROB).all()
    assert (np.diff(top[1:], axis=1) <= 0).all() and (top[1:, 0] >= lps[1:] - 1e-6).all()
    chunked = Engine(base, SamplerConfig(prompt_logprob_chunk=2))
    try:
        np.testing.assert_allclose(_one(chunked, GenRequest(PROMPT, p.SamplingParams(max_tokens=1),
                                                            prompt_logprobs=True)).prompt_logprobs[1:], lps[1:],
                                   atol=1e-6, rtol=0)
    finally:
        chunked.close()
    single = _one(engine, GenRequest(PROMPT[:1], p.SamplingParams(max_tokens=1), prompt_logprobs=True))
    assert single.prompt_logprobs.shape == (1,) and math.isnan(single.prompt_logprobs[0])
