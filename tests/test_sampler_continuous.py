"""Continuous batching on a tiny random Llama, driven step by step (ModelEngine, the engine thread's unit):
a request joining a running batch samples exactly what it samples alone; shared and cached prompt prefixes give
what unshared ones give; stop strings across token boundaries; an adapter's new version next to the old one;
failures stay with their request and always say what happened."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
from sampler_support import train_peft_adapter

from bus_events import payloads as p
from sampler_consumer.config import SamplerConfig
from sampler_consumer.engine_core import EngineCore, ModelEngine
from sampler_consumer.requests import AdapterCheckpoint, GenFailure, GenOutput, GenRequest, describe

pytest_plugins = ["sampler_support"]  # tiny_dir, base

PROMPT = [5, 17, 42, 99, 7, 133, 250, 12, 64, 3, 201, 88, 19, 77, 140, 9, 31, 4, 66]  # 19 tokens: partial page
SEEDED = p.SamplingParams(max_tokens=24, temperature=1.0, seed=5, stop=[])


@pytest.fixture(scope="module")
def checkpoints(tiny_dir):
    path = "tinker://r:train:0/sampler_weights/latest"
    return [AdapterCheckpoint((path, f"v{seed}"), train_peft_adapter(tiny_dir, seed=seed)) for seed in (1, 2)]


def _engine(base, **config) -> ModelEngine:
    return ModelEngine(base, SamplerConfig(page_size=4, **config))


def _run(engine: ModelEngine, requests: list[GenRequest], join_after: dict[int, int] | None = None) -> list:
    """Answers of `requests`; request i is added after join_after[i] steps (default: before the first)."""
    join_after = join_after or {}
    answers: list = [None] * len(requests)
    steps = 0
    while True:
        for i, request in enumerate(requests):
            if join_after.get(i, 0) == steps:
                engine.add(request, lambda result, i=i: answers.__setitem__(i, result))
        if not engine.has_work and all(after <= steps for after in join_after.values()):
            break
        engine.step()
        steps += 1
    assert all(answer is not None for answer in answers), "every request is answered"
    return answers


def _same(a: GenOutput, b: GenOutput) -> None:
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    for x, y in zip(a.sequences, b.sequences, strict=True):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
        assert x.stop_reason == y.stop_reason


def test_a_request_joining_a_running_batch_samples_what_it_samples_alone(base, checkpoints):
    target = GenRequest(PROMPT[:11], SEEDED, adapter=checkpoints[0], num_samples=2)
    [alone] = _run(_engine(base), [target])
    running = [GenRequest(PROMPT, p.SamplingParams(max_tokens=40, temperature=0.9, top_k=20, seed=1, stop=[])),
               GenRequest(PROMPT[3:], p.SamplingParams(max_tokens=30, temperature=1.2, top_p=0.8, seed=2, stop=[]),
                          adapter=checkpoints[1], num_samples=3)]
    joined = _run(_engine(base), [*running, target], join_after={2: 7})
    _same(alone, joined[2])
    assert len(joined[0].sequences[0].tokens) == 40 and len(joined[1].sequences) == 3


def test_shared_and_cached_prefixes_give_what_unshared_prompts_give(base):
    engine = _engine(base)
    # Four calls of one RL group (one sample each, sample indices 0..3) vs one call with num_samples=4.
    group = [GenRequest(PROMPT, SEEDED, first_sample=i) for i in range(4)]
    calls = _run(engine, group)
    [together] = _run(engine, [GenRequest(PROMPT, SEEDED, num_samples=4)])
    assert engine.pool.hits > 0  # the second prefill found the first one's full pages
    assert [c.sequences[0].tokens for c in calls] == [s.tokens for s in together.sequences]
    # Unshared: each sample alone, on a fresh engine (no cached pages).
    for i, call in enumerate(calls):
        fresh = _engine(base)
        [alone] = _run(fresh, [GenRequest(PROMPT, SEEDED, first_sample=i)])
        assert fresh.pool.hits == 0
        _same(alone, call)
    # Everything finished: every page is free or idle in the prefix cache.
    assert engine.pool.available == engine.pool.num_pages - 1 and engine.scheduler.reserved == 0


def test_a_stop_string_spanning_two_tokens_stops_on_the_second(base):
    engine = _engine(base)
    [free] = _run(engine, [GenRequest(PROMPT, SEEDED)])
    tokens = free.sequences[0].tokens
    for i in range(2, len(tokens) - 1):
        head, tail = base.decode(tokens[i:i + 1]), base.decode(tokens[i + 1:i + 2])
        stop = head[-1:] + tail[:1]
        text_before = base.decode(tokens[:i + 1])
        if len(head) and len(tail) and "\ufffd" not in head + tail and stop not in text_before:
            break
    else:
        pytest.fail("no two neighbouring tokens to stop across")
    [stopped] = _run(engine, [GenRequest(PROMPT, SEEDED.__class__(**{**_params(SEEDED), "stop": [stop]}))])
    assert stopped.sequences[0].tokens == tokens[:i + 2] and stopped.sequences[0].stop_reason == "stop"


def _params(params: p.SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__struct_fields__}


def test_a_new_adapter_version_runs_beside_the_old_one_mid_stream(base, checkpoints):
    old, new = (GenRequest(PROMPT, SEEDED, adapter=c) for c in checkpoints)
    [old_alone], [new_alone] = _run(_engine(base), [old]), _run(_engine(base), [new])
    assert old_alone.sequences[0].tokens != new_alone.sequences[0].tokens  # the versions differ
    engine = _engine(base)
    both = _run(engine, [old, new], join_after={1: 5})  # v2 saved at the same path while v1 is sampling
    _same(old_alone, both[0])
    _same(new_alone, both[1])
    assert set(engine.base.lora.adapters) >= {c.key for c in checkpoints}


def test_a_bad_request_fails_alone_with_a_message_and_callbacks_cannot_stop_the_engine(base, checkpoints):
    broken = AdapterCheckpoint(("tinker://r:train:0/sampler_weights/broken", "v"), checkpoint=None)
    good = GenRequest(PROMPT, SEEDED, adapter=checkpoints[0])
    answers = _run(_engine(base), [good, GenRequest(PROMPT, SEEDED, adapter=broken), good,
                                   GenRequest([5, 10**6], SEEDED)])
    assert isinstance(answers[0], GenOutput) and isinstance(answers[2], GenOutput)
    _same(answers[0], answers[2])
    for failure in answers[1], answers[3]:
        assert isinstance(failure, GenFailure) and failure.category == "user" and failure.message.strip()
    assert "AttributeError" in answers[1].message and "outside the vocabulary" in answers[3].message
    assert describe(AssertionError()) == "AssertionError()"
    assert describe(ValueError("bad")) == "ValueError: bad"
    # On the engine thread: a caller's callback that raises is logged, and the engine answers the next request.
    core = EngineCore(lambda _name: _engine(base))
    try:
        core.submit(base.name, good, lambda result: 1 / 0)
        after: Future = Future()
        core.submit(base.name, good, after.set_result)
        _same(answers[0], after.result(timeout=120))
    finally:
        core.stop()
