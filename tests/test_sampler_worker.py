"""The sampler worker end to end over the real Tansu broker and S3: Sample events in, results out,
poisoned events to the dead-letter topic while the worker carries on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import msgpack
import pytest
from metrics_support import scrape
from sampler_support import add_session, job, sample_request, save_sampler_weights, sequences, train_peft_adapter

from artifact_store import CheckpointStore, Registry
from bus_events import EventType, decode_envelope, decode_payload, make_event
from bus_events import payloads as p
from bus_runtime.health import read_health
from bus_runtime.kafka_io import make_consumer, make_producer, publish
from bus_runtime.metrics import bounded_label
from bus_runtime.testing import make_tiny_model
from sampler_consumer.config import SamplerConfig
from sampler_consumer.service import SamplerService
from sampler_consumer.worker import run_sampler

PROMPT = [5, 17, 42, 99, 7, 133]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


async def _collect(settings, topic: str, want: int, group: str, timeout: float = 60) -> list:
    consumer = make_consumer(settings, topic, group_id=group)
    await consumer.start()
    found = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < want:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(decode_envelope(r.value) for r in records)
    finally:
        await consumer.stop()
    return found


@contextlib.asynccontextmanager
async def _running_sampler(settings, config: SamplerConfig | None = None):
    ready = asyncio.Event()
    task = asyncio.create_task(run_sampler(settings, ready=ready, config=config or SamplerConfig()))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        yield task
        assert not task.done(), "the worker stopped"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_worker_answers_samples_over_the_broker_and_dead_letters_poison(settings, store, tiny_dir):
    settings = dataclasses.replace(settings, device="cpu")
    base = str(tiny_dir)
    ckpts, registry = CheckpointStore(store), Registry(store)
    paths = [save_sampler_weights(ckpts, "s:train:0", f"a{seed}", train_peft_adapter(tiny_dir, seed=seed), base)
             for seed in (1, 2)]
    sessions = [add_session(registry, f"s:sample:{i}", base, path) for i, path in enumerate(paths)]
    requests = [
        sample_request(sessions[0], PROMPT),
        sample_request(sessions[1], PROMPT, prompt_logprobs=True),
        sample_request(sessions[1], PROMPT[:3], num_samples=3,
                       params=p.SamplingParams(max_tokens=5, temperature=1.0, seed=9, stop=[])),
        sample_request("s:sample:unknown", PROMPT),
    ]
    valid_jobs = [job(r) for r in requests]
    after_poison = job(sample_request(sessions[0], PROMPT[:4]))
    bad_payload = msgpack.packb({"v": 1, "type": "sample", "request_id": "req-badpayload", "model_id": sessions[0],
                                 "payload": {"sampling_session_id": sessions[0], "num_samples": "many",
                                             "prompt": {"dtype": "int32", "shape": [0], "data": b""}}})
    wrong_type_env, wrong_type = make_event(EventType.OPTIM_STEP, p.OptimStep(), model_id=sessions[0])

    async with _running_sampler(settings):
        producer = make_producer(settings)
        await producer.start()
        try:
            for sample_job in valid_jobs:
                await publish(producer, settings.topics.sample, sample_job.env, sample_job.request,
                              claim_check_bytes=settings.claim_check_bytes)
            await producer.send_and_wait(settings.topics.sample, b"\xc1 not an event", key=b"junk")
            await producer.send_and_wait(settings.topics.sample, bad_payload, key=sessions[0].encode())
            await publish(producer, settings.topics.sample, wrong_type_env, wrong_type,
                          claim_check_bytes=settings.claim_check_bytes)
            await publish(producer, settings.topics.sample, after_poison.env, after_poison.request,
                          claim_check_bytes=settings.claim_check_bytes)
        finally:
            await producer.stop()
        # 5 sample replies + the 2 poisoned events whose request_id was readable get an error reply.
        replies = await _collect(settings, settings.topics.replies, 7, "test-replies")
        dead = await _collect(settings, settings.topics.dead_letter, 3, "test-dead-letters")

    results = {env.request_id: decode_payload(env, store) for env in replies}
    reference = SamplerService(settings, SamplerConfig(), store)
    try:
        expected = reference.run_batch([*valid_jobs, after_poison])
    finally:
        reference.close()
    for (env, want) in expected:
        got = results[env.request_id]
        assert got.request_type == "sample"
        if want.error is not None:
            assert got.error.category == "user" and "unknown sampling session" in got.error.message
            continue
        assert [s[0] for s in sequences(got)] == [s[0] for s in sequences(want)]
        assert [s[2] for s in sequences(got)] == [s[2] for s in sequences(want)]
    assert len(sequences(results[valid_jobs[2].env.request_id])) == 3
    assert results[valid_jobs[1].env.request_id].result["prompt_logprobs"] is not None
    for request_id in ("req-badpayload", wrong_type_env.request_id):
        assert results[request_id].error.category == "user"

    letters = [decode_payload(env) for env in dead]
    assert sorted(letter.stage for letter in letters) == ["decode", "validate", "validate"]
    assert any("num_samples" in letter.reason for letter in letters)
    assert any("optim_step events do not belong on this topic" in letter.reason for letter in letters)
    assert all(letter.source_topic == settings.topics.sample for letter in letters)


async def test_the_sampler_counts_what_it_answered_on_its_metrics_endpoint(settings, store, tiny_dir):
    settings = dataclasses.replace(settings, device="cpu")
    base = str(tiny_dir)
    path = save_sampler_weights(CheckpointStore(store), "s:train:0", "a1", train_peft_adapter(tiny_dir, seed=1), base)
    session = add_session(Registry(store), "s:sample:0", base, path)
    label = bounded_label(base, settings.base_models)  # a base model outside the configured ones counts as "other"
    jobs = [job(sample_request(session, PROMPT)), job(sample_request(session, PROMPT)),
            job(sample_request("s:sample:unknown", PROMPT))]
    async with _running_sampler(settings):
        producer = make_producer(settings)
        await producer.start()
        try:
            for sample_job in jobs:
                await publish(producer, settings.topics.sample, sample_job.env, sample_job.request,
                              claim_check_bytes=settings.claim_check_bytes)
            await producer.send_and_wait(settings.topics.sample, b"\xc1 not an event", key=b"junk")
        finally:
            await producer.stop()
        await _collect(settings, settings.topics.replies, len(jobs), "test-metric-replies")
        [sampler] = [w for w in read_health(store) if w.role == "sampler"]
        url = sampler.detail["metrics_url"]
        for _ in range(50):  # the counters move right after each reply's publish returns
            got = scrape(url)
            if got.get(("tinker_bus_sampler_failures_total", (("reason", "dead_letter"),))) == 1 and \
                    got.get(("tinker_bus_sampler_requests_total", (("base_model", label), ("outcome", "ok")))) == 2:
                break
            await asyncio.sleep(0.1)
    assert url.startswith("http://127.0.0.1:")
    assert got[("tinker_bus_sampler_requests_total", (("base_model", label), ("outcome", "ok")))] == 2
    assert got[("tinker_bus_sampler_failures_total", (("reason", "user"),))] == 1
    assert got[("tinker_bus_sampler_failures_total", (("reason", "dead_letter"),))] == 1
    assert got[("tinker_bus_sampler_generated_tokens_total", (("base_model", label),))] > 0
    assert got[("tinker_bus_sampler_time_to_first_token_seconds_count", (("base_model", label),))] >= 1
    prefix = sum(v for (name, labels), v in got.items() if name == "tinker_bus_sampler_cache_lookups_total"
                 and ("cache", "prefix") in labels)
    assert prefix >= 1  # every prefill looks the prompt up
    assert {"running_rows", "waiting_rows"} <= set(sampler.detail)


async def test_a_streamed_sample_publishes_its_tokens_as_deltas_before_its_result(settings, store, tiny_dir):
    settings = dataclasses.replace(settings, device="cpu")
    session = add_session(Registry(store), "s:sample:stream", str(tiny_dir), None)
    streamed = job(sample_request(session, PROMPT, num_samples=2, stream=True,
                                  params=p.SamplingParams(max_tokens=64, temperature=1.0, seed=4, stop=[])))
    plain = job(sample_request(session, PROMPT[:3]))
    # A short interval: the 64 decode steps then span many polls, however fast this machine runs them.
    async with _running_sampler(settings, SamplerConfig(stream_interval_s=0.005)):
        producer = make_producer(settings)
        await producer.start()
        try:
            for sample_job in (streamed, plain):
                await publish(producer, settings.topics.sample, sample_job.env, sample_job.request,
                              claim_check_bytes=settings.claim_check_bytes)
        finally:
            await producer.stop()
        consumer = make_consumer(settings, settings.topics.replies, group_id="test-stream-replies")
        await consumer.start()
        seen: list = []  # (envelope, payload) in partition order, up to both results
        try:
            async with asyncio.timeout(60):
                while sum(env.type == EventType.RESULT for env, _ in seen) < 2:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        envelopes = [decode_envelope(record.value) for record in records]
                        seen.extend((env, decode_payload(env)) for env in envelopes)
        finally:
            await consumer.stop()

    assert not [env for env, _ in seen if env.type == EventType.SAMPLE_DELTA and env.request_id == plain.env.request_id]
    mine = [(env, payload) for env, payload in seen if env.request_id == streamed.env.request_id]
    result_at = next(i for i, (env, _) in enumerate(mine) if env.type == EventType.RESULT)
    deltas = [payload for env, payload in mine[:result_at] if env.type == EventType.SAMPLE_DELTA]
    assert len(deltas) > 1, "the tokens did not come in several deltas"
    assert all(env.model_id == session and env.tenant == streamed.env.tenant for env, _ in mine)
    rebuilt: dict[int, tuple[list[int], list[float]]] = {0: ([], []), 1: ([], [])}
    for delta in deltas:
        for piece in delta.sequences:
            tokens, logprobs = rebuilt[piece.index]
            assert piece.start <= len(tokens)
            tokens[piece.start:], logprobs[piece.start:] = piece.tokens, piece.logprobs
    final = sequences(mine[result_at][1])
    for index, (tokens, logprobs, _) in enumerate(final):
        assert 0 < len(rebuilt[index][0]) <= len(tokens)
        assert rebuilt[index][0] == tokens[:len(rebuilt[index][0])]
        assert rebuilt[index][1] == logprobs[:len(rebuilt[index][1])]
