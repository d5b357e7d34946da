"""Helpers of the recovery tests: a bus client that plays the SDK's part (publishes a model's events, waits for
results the way a client awaits futures), trainers in-process or as killable subprocesses, and weight digests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
import torch
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from trainer_support import adam, fb, random_data

from artifact_store import CheckpointStore, TinkerPath
from bus_events import EventType, Topics, decode_envelope, decode_payload, encode_event, make_event
from bus_events import payloads as p
from bus_events.results import outcome
from bus_runtime.kafka_io import ensure_topics, make_consumer, make_producer
from bus_runtime.settings import BusSettings, open_object_store
from tinker_bus.infra import stop_process
from trainer_consumer.config import TrainerConfig
from trainer_consumer.replay.fingerprint import adapter_sha256
from trainer_consumer.worker import run_trainer

REPO = Path(__file__).resolve().parent.parent
Event = tuple[EventType, msgspec.Struct, int]


def supervised_events(base_model: str, seed: int, steps: int, *, lr: float = 0.02, eval_every: int = 0,
                      datums: int = 3) -> list[Event]:
    """create; `steps` x (forward_backward, optim_step) with a forward-only eval every `eval_every` steps; then a
    named sampler save "final"."""
    events: list[Event] = [(EventType.CREATE_MODEL,
                            p.CreateModel(base_model=base_model, lora=p.LoraSpec(rank=4, seed=seed)), 0)]
    for step in range(steps):
        events.append((EventType.FORWARD_BACKWARD, fb(random_data(seed * 1000 + step, datums)), len(events)))
        events.append((EventType.OPTIM_STEP, adam(lr=lr), len(events)))
        if eval_every and (step + 1) % eval_every == 0:
            events.append((EventType.FORWARD_BACKWARD, fb(random_data(seed, 2), forward_only=True), len(events)))
    events.append((EventType.SAVE_WEIGHTS_FOR_SAMPLER, p.SaveWeightsForSampler(name="final"), len(events)))
    return events


def fresh_settings(settings: BusSettings, name: str, **overrides: object) -> BusSettings:
    """Topics, bucket and trainer group of their own, on the same broker and S3."""
    unique = f"{name}{uuid.uuid4().hex[:6]}"
    topics = Topics(prefix=f"t{unique}", train_partitions=4, sample_partitions=2, reply_partitions=2)
    fresh = replace(settings, topics=topics, bucket=f"tb-{unique}", trainer_group=f"trainers-{unique}", **overrides)
    open_object_store(fresh).ensure_bucket()
    return fresh


@dataclass
class BusClient:
    """Publishes training events and reads EVERY result on the reply topic (re-published ones too)."""

    settings: BusSettings
    results: dict[str, list[p.Result]] = field(default_factory=dict)
    published: dict[str, tuple[str, int]] = field(default_factory=dict)  # request_id -> (model_id, seq_id)

    async def __aenter__(self) -> BusClient:
        await ensure_topics(self.settings)
        self.objects = open_object_store(self.settings)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.reader = make_consumer(self.settings, group_id=None)
        await self.reader.start()
        tps = [TopicPartition(self.settings.topics.replies, n) for n in range(self.settings.topics.reply_partitions)]
        self.reader.assign(tps)
        for tp in tps:
            self.reader.seek(tp, 0)
        self._changed = asyncio.Event()
        self._reading = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        # After a broker restart aiokafka's fetcher may re-raise the cancellation of its own retry task here.
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        while True:
            try:
                batches = await self.reader.getmany(timeout_ms=100)
            except Exception:  # the broker restarts in one test: keep asking
                await asyncio.sleep(0.2)
                continue
            for records in batches.values():
                for record in records:
                    env = decode_envelope(record.value)
                    result = await asyncio.to_thread(decode_payload, env, self.objects)
                    self.results.setdefault(env.request_id, []).append(result)
                    self._changed.set()

    async def publish(self, model_id: str, event: Event) -> str:
        kind, payload, seq = event
        env, body = make_event(kind, payload, model_id=model_id, seq_id=seq)
        raw = await asyncio.to_thread(encode_event, env, body, blob_store=self.objects,
                                      claim_check_bytes=self.settings.claim_check_bytes)
        self.published[env.request_id] = (model_id, seq)
        await self.send(self.settings.topics.train, raw, model_id)
        return env.request_id

    async def send(self, topic: str, raw: bytes, key: str, retry_s: float = 60.0) -> None:
        """Produce, retrying while the broker is away (a client would retry its POST the same way)."""
        deadline = asyncio.get_running_loop().time() + retry_s
        while True:
            try:
                await self.producer.send_and_wait(topic, raw, key=key.encode())
                return
            except KafkaError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def result(self, request_id: str, timeout: float = 120.0) -> p.Result:
        async with asyncio.timeout(timeout):
            while request_id not in self.results:
                self._changed.clear()
                await self._changed.wait()
        return self.results[request_id][0]

    async def drive(self, model_id: str, events: Sequence[Event], window: int = 2,
                    timeout: float = 120.0) -> list[str]:
        """Publish the model's events in order with at most `window` unanswered (the SDK pipelines
        forward_backward and optim_step); every result must be a success."""
        ids: list[str] = []
        for event in events:
            if len(ids) >= window:
                await self._ok(ids[-window], timeout)
            ids.append(await self.publish(model_id, event))
        for request_id in ids[-window:]:
            await self._ok(request_id, timeout)
        return ids

    async def _ok(self, request_id: str, timeout: float) -> None:
        result = await self.result(request_id, timeout)
        assert result.error is None, (self.published[request_id], result.error)

    def resolved_once(self, request_ids: Sequence[str]) -> dict[str, int]:
        """Each future resolved, and every re-published result equal to the first (a first-wins future table,
        like the gateway's, therefore resolves each exactly once and to the same value). Returns how many
        results each request got."""
        for request_id in request_ids:
            results = self.results.get(request_id)
            assert results, f"request {self.published[request_id]} never got a result"
            first = outcome(results[0])  # when each was computed differs, what it says must not
            assert all(outcome(r) == first for r in results[1:]), \
                f"request {self.published[request_id]} got differing results"
        return {r: len(self.results[r]) for r in request_ids}

    def result_values(self, request_ids: Sequence[str]) -> list[dict]:
        return [outcome(self.results[r][0]) for r in request_ids]


def sampler_sha(settings: BusSettings, model_id: str, name: str = "final") -> str:
    store = CheckpointStore(open_object_store(settings))
    return adapter_sha256(store.load(TinkerPath(model_id, "sampler_weights", name)).adapter_weights)


@contextlib.asynccontextmanager
async def trainers(settings: BusSettings, count: int = 1, config: TrainerConfig | None = None
                   ) -> AsyncIterator[list[asyncio.Task]]:
    """`count` trainers (run_trainer) as tasks of this event loop, once each has joined the group."""
    threads = torch.get_num_threads()  # a config with torch_threads changes it process-wide: put it back after
    readies = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(run_trainer(settings, ready=ready, config=config), name=f"trainer-{i}")
             for i, ready in enumerate(readies)]
    try:
        waiting = asyncio.ensure_future(asyncio.gather(*(r.wait() for r in readies)))
        done, _ = await asyncio.wait([waiting, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task in done:
                await task  # died on startup: raise why
        assert waiting in done, "trainers did not join their group within 60 s"
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        torch.set_num_threads(threads)


class PartProcess:
    """`python -m tinker_bus <role> [args]` with the settings in its environment and `config` as
    TINKER_BUS_<ROLE>_<NAME> variables; SIGKILL-able."""

    def __init__(self, role: str, settings: BusSettings, log_file: Path, args: Sequence[str] = (),
                 **config: object):
        prefix = f"TINKER_BUS_{role.upper()}_"
        self.env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": "1", **{f"{prefix}{k.upper()}": str(v) for k, v in config.items()}}
        self.command = [sys.executable, "-m", "tinker_bus", role, *args]
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log_file.open("ab") as out:
            out.write(f"\n===== start {self.starts}\n".encode())
            self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class TrainerProcess(PartProcess):
    """`python -m tinker_bus trainer` on one torch thread."""

    def __init__(self, settings: BusSettings, log_file: Path, **trainer_config: object):
        super().__init__("trainer", settings, log_file, torch_threads=1, **trainer_config)
