"""SamplerService with real S3: sessions, the adapter LRU (eviction + reload, version keys), errors, chunking."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
from sampler_support import (
    add_session,
    job,
    sample_request,
    sample_result,
    save_sampler_weights,
    sequences,
    train_peft_adapter,
)

from artifact_store import CheckpointStore, Registry, TinkerPath
from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_runtime.testing import make_tiny_model
from sampler_consumer.config import SamplerConfig
from sampler_consumer.service import SamplerService

RUN = "sess:train:0"
PROMPT = [5, 17, 42, 99, 7, 133]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def trained(tiny_dir):
    return [train_peft_adapter(tiny_dir, seed=seed, rank=4) for seed in (1, 2, 3)]


_open: list[SamplerService] = []


@pytest.fixture(autouse=True)
def _close_services():
    yield
    while _open:
        _open.pop().close()


def _service(settings, store, **config) -> SamplerService:
    service = SamplerService(dataclasses.replace(settings, device="cpu"), SamplerConfig(**config), store)
    _open.append(service)
    return service


def _slots(service: SamplerService, base: str):
    """The engine's adapter slot table of `base` (read on the engine thread)."""
    return service.core.call(lambda core: core.engines[base].base.lora.adapters).result()


@pytest.fixture
def world(settings, store, tiny_dir, trained):
    """Three adapters saved at three paths, one sampling session each, plus a base-model session."""
    base = str(tiny_dir)
    ckpts, registry = CheckpointStore(store), Registry(store)
    paths = [save_sampler_weights(ckpts, RUN, f"a{i}", ckpt, base) for i, ckpt in enumerate(trained)]
    sessions = [add_session(registry, f"sess:sample:{i}", base, path) for i, path in enumerate(paths)]
    add_session(registry, "sess:sample:base", base, None)
    return dataclasses.make_dataclass("World", ["base", "ckpts", "registry", "paths", "sessions"])(
        base, ckpts, registry, paths, sessions)


def _greedy(service: SamplerService, session: str, prompt=PROMPT):
    [(_, result)] = service.run_batch([job(sample_request(session, prompt))])
    return sequences(result)


def test_lru_evicts_and_reloads_on_demand(settings, store, world):
    service = _service(settings, store, adapter_cache_size=2)
    first = [_greedy(service, s) for s in world.sessions]
    cache = _slots(service, world.base)
    assert (cache.stats.loads, cache.stats.evictions) == (3, 1)
    assert [key[0] for key in cache] == world.paths[1:]  # a0 was least recently used
    assert len({tuple(seqs[0][0]) for seqs in first}) == 3  # three adapters, three outputs
    assert _greedy(service, world.sessions[0]) == first[0]  # reloaded, same weights, same tokens
    assert (cache.stats.loads, cache.stats.evictions) == (4, 2)
    assert _greedy(service, world.sessions[0]) == first[0]
    assert cache.stats.hits == 1
    assert _greedy(service, "sess:sample:base") not in first


def test_one_batch_with_more_adapters_than_the_cache_holds(settings, store, world):
    service = _service(settings, store, adapter_cache_size=1)
    replies = service.run_batch([job(sample_request(s, PROMPT)) for s in world.sessions * 2])
    singles = [_greedy(_service(settings, store), s) for s in world.sessions]
    assert [sequences(result) for _, result in replies] == singles * 2


def test_an_overwritten_path_is_sampled_at_its_new_version(settings, store, world, trained):
    service = _service(settings, store)
    path = save_sampler_weights(world.ckpts, RUN, "latest", trained[0], world.base)
    session = add_session(world.registry, "sess:sample:latest", world.base, path)
    before = _greedy(service, session)
    assert before == _greedy(service, world.sessions[0])
    save_sampler_weights(world.ckpts, RUN, "latest", trained[1], world.base, overwrite=True)
    assert _greedy(service, session) == _greedy(service, world.sessions[1]) != before


def test_num_samples_split_over_batches_keeps_seeded_tokens(settings, store, world):
    request = sample_request(world.sessions[0], PROMPT, num_samples=7, prompt_logprobs=True,
                             params=p.SamplingParams(max_tokens=6, temperature=1.0, seed=5, stop=[]))
    [(_, whole)] = _service(settings, store).run_batch([job(request)])
    [(_, split)] = _service(settings, store, max_batch_rows=3).run_batch([job(request)])
    assert len(sequences(whole)) == 7
    for (tokens, logprobs, reason), (tokens2, logprobs2, reason2) in zip(sequences(split), sequences(whole),
                                                                         strict=True):
        assert (tokens, reason) == (tokens2, reason2)
        np.testing.assert_allclose(logprobs, logprobs2, atol=1e-5, rtol=0)  # other batch shapes: float noise
    np.testing.assert_array_equal(sample_result(split).prompt_logprobs.numpy(),
                                  sample_result(whole).prompt_logprobs.numpy())


def test_bad_requests_get_user_errors_and_good_ones_still_succeed(settings, store, world):
    registry = world.registry
    other_base = save_sampler_weights(world.ckpts, "other:train:0", "x", world.ckpts.load(
        TinkerPath.parse(world.paths[0])), "some-org/another-model")
    add_session(registry, "sess:sample:other", world.base, other_base)
    add_session(registry, "sess:sample:gone", world.base, f"tinker://{RUN}/sampler_weights/never-saved")
    add_session(registry, "sess:sample:nomodel", "no-such-org/no-such-model", None)
    add_session(registry, "sess:sample:acme", world.base, None, tenant="acme")
    good = sample_request(world.sessions[0], PROMPT)
    cases = {
        "unknown sampling session": sample_request("sess:sample:404", PROMPT),
        "another tenant's session": sample_request("sess:sample:acme", PROMPT),
        "trained on 'some-org/another-model'": sample_request("sess:sample:other", PROMPT),
        "no checkpoint at": sample_request("sess:sample:gone", PROMPT),
        "cannot be loaded": sample_request("sess:sample:nomodel", PROMPT),
        "outside the vocabulary": sample_request(world.sessions[0], [5, 100000]),
        "prompt is empty": sample_request(world.sessions[0], []),
        "exceeds the model's context": sample_request(world.sessions[0], PROMPT,
                                                      params=p.SamplingParams(max_tokens=5000)),
        "empty string": sample_request(world.sessions[0], PROMPT, params=p.SamplingParams(stop=["", 3])),
        "topk_prompt_logprobs": sample_request(world.sessions[0], PROMPT, topk_prompt_logprobs=100000),
        "1-D int32/int64": msgspec.structs.replace(good, prompt=tensor_from_numpy(np.ones(3, dtype=np.float32))),
    }
    jobs = [job(request) for request in cases.values()]  # all from tenant "default"
    jobs.append(job(good))
    replies = _service(settings, store).run_batch(jobs)
    assert [env.request_id for env, _ in replies] == [j.env.request_id for j in jobs]
    for message, (_, result) in zip(cases, replies[:-1], strict=True):
        assert result.result is None and result.error.category == "user", (message, result)
        message = "unknown sampling session" if message == "another tenant's session" else message
        assert message in result.error.message
        assert result.request_type == "sample"
    assert sequences(replies[-1][1]) == _greedy(_service(settings, store), world.sessions[0])


def test_a_split_request_keeps_its_sampling_outputs(settings, store, world):
    """Issue 16.2 through the service: top-k logprobs on every sequence of every piece, the prompt's outputs
    (target_prompt_logprobs, prompt_alt_tokens) computed once by the first piece, as an unsplit request has them."""
    ids = np.full((len(PROMPT) - 1, 2), -1, dtype=np.int64)
    ids[:, 0] = PROMPT[1:]
    request = sample_request(world.sessions[0], PROMPT, num_samples=7, topk_sample_logprobs=2, prompt_alt_tokens_k=3,
                             target_prompt_logprobs=tensor_from_numpy(ids),
                             params=p.SamplingParams(max_tokens=4, temperature=1.0, seed=5, stop=[]))
    [(_, whole)] = _service(settings, store).run_batch([job(request)])
    [(_, split)] = _service(settings, store, max_batch_rows=3).run_batch([job(request)])
    whole, split = sample_result(whole), sample_result(split)
    assert len(split.sequences) == 7
    for a, b in zip(split.sequences, whole.sequences, strict=True):
        assert a.topk_logprobs.token_ids.shape == [4, 2]
        np.testing.assert_array_equal(a.topk_logprobs.token_ids.numpy(), b.topk_logprobs.token_ids.numpy())
    for result in (whole, split):
        assert result.target_prompt_logprobs.shape == [len(PROMPT) - 1, 2]
        assert result.prompt_alt_tokens.tokens.shape == [len(PROMPT) - 1, 3]
    np.testing.assert_array_equal(split.target_prompt_logprobs.numpy(), whole.target_prompt_logprobs.numpy())
    np.testing.assert_array_equal(split.prompt_alt_tokens.tokens.numpy(), whole.prompt_alt_tokens.tokens.numpy())
