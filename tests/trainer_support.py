"""Helpers shared by the trainer tests: datums, an in-process engine harness, adapter weight access."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import msgspec
import numpy as np
import torch

from artifact_store import CheckpointStore, MinioObjectStore, ObjectStore, S3Config, TinkerPath
from bus_events import (
    Envelope,
    EventType,
    Reply,
    decode_envelope,
    decode_payload,
    encode_event,
    make_event,
    tensor_from_numpy,
)
from bus_events import payloads as p
from bus_runtime.settings import BusSettings, open_object_store
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.backends.hf_peft import HfPeftBackend
from trainer_consumer.config import TrainerConfig
from trainer_consumer.engine import TrainerEngine
from trainer_consumer.inbound import Inbound
from trainer_consumer.runtime import Runtime, Storage


def datum(sequence: Sequence[int], weights: Sequence[float] | None = None, **extra: Sequence[float]) -> p.Datum:
    """A next-token datum: tokens = sequence[:-1] predict targets = sequence[1:]."""
    seq = np.asarray(sequence)
    n = len(seq) - 1
    inputs = {"target_tokens": tensor_from_numpy(seq[1:], "int64"),
              "weights": tensor_from_numpy(np.ones(n) if weights is None else np.asarray(weights), "float32")}
    inputs.update({k: tensor_from_numpy(np.asarray(v), "float32") for k, v in extra.items()})
    return p.Datum(tokens=tensor_from_numpy(seq[:-1], "int32"), loss_fn_inputs=inputs)


def random_data(seed: int, count: int, vocab: int = 200, lengths: tuple[int, int] = (6, 14)) -> list[p.Datum]:
    rng = np.random.default_rng(seed)
    return [datum(rng.integers(0, vocab, int(rng.integers(*lengths)) + 1)) for _ in range(count)]


def adapter_weights(backend: HfPeftBackend, model_id: str) -> dict[str, torch.Tensor]:
    return backend.export_adapter(model_id).weights


def adapter_grads(backend: HfPeftBackend, model_id: str) -> dict[str, torch.Tensor]:
    params = backend._models.adapters[model_id].params
    return {k: v.grad.detach().clone() for k, v in params.items() if v.grad is not None}


def fresh_objects(s3_endpoint: str) -> ObjectStore:
    objects = MinioObjectStore(S3Config(s3_endpoint, "testing", "testing", f"tr-{uuid.uuid4().hex[:8]}"))
    objects.ensure_bucket()
    return objects


class EngineHarness:
    """A TrainerEngine with the real HF backend and real S3, whose sink records replies by request_id."""

    def __init__(self, base_model: str, objects: ObjectStore, config: TrainerConfig | None = None,
                 backend: HfPeftBackend | None = None):
        self.base_model = base_model
        self.backend = backend or HfPeftBackend()
        self.objects = objects
        self.runtime = Runtime(self.backend, Storage.on(objects), config or TrainerConfig(), (base_model,))
        self.engine = TrainerEngine(self.runtime, self._sink)
        self.replies: dict[str, list[p.Result]] = {}
        self.finished: list[Inbound] = []
        self._changed = asyncio.Event()

    async def _sink(self, inbound: Inbound, replies: list[Reply]) -> None:
        self.finished.append(inbound)
        for env, result in replies:
            self.replies.setdefault(env.request_id, []).append(result)
        self._changed.set()

    async def __aenter__(self) -> EngineHarness:
        self.engine.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.stop()

    def event(self, event_type: EventType, payload: object, model_id: str, seq_id: int | None,
              tenant: str = "default") -> Inbound:
        env, body = make_event(event_type, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)  # type: ignore[arg-type]
        return Inbound(env, body)

    async def send(self, event_type: EventType, payload: object, model_id: str, seq_id: int | None,
                   tenant: str = "default") -> str:
        inbound = self.event(event_type, payload, model_id, seq_id, tenant)
        await self.engine.submit(inbound)
        return inbound.env.request_id

    async def reply(self, request_id: str, timeout: float = 60.0) -> p.Result:
        async with asyncio.timeout(timeout):
            while request_id not in self.replies:
                self._changed.clear()
                await self._changed.wait()
        return self.replies[request_id][0]

    async def call(self, event_type: EventType, payload: object, model_id: str, seq_id: int | None,
                   tenant: str = "default") -> p.Result:
        return await self.reply(await self.send(event_type, payload, model_id, seq_id, tenant))

    async def ok(self, event_type: EventType, payload: object, model_id: str, seq_id: int | None) -> dict:
        result = await self.call(event_type, payload, model_id, seq_id)
        assert result.error is None, result.error
        assert result.result is not None
        return result.result

    async def create(self, model_id: str, rank: int = 4, seed: int = 7, **lora: bool) -> dict:
        return await self.ok(EventType.CREATE_MODEL,
                             p.CreateModel(base_model=self.base_model, lora=p.LoraSpec(rank=rank, seed=seed, **lora)),
                             model_id, 0)


class BlockingBackend:
    """An HfPeftBackend whose forward_backwards of one model block the compute thread until `release` is set: a
    step exactly as long as the test wants, on any machine."""

    def __init__(self, model_id: str):
        self.inner = HfPeftBackend()
        self.model_id = model_id
        self.entered = threading.Event()  # set once such a step occupies the compute thread
        self.release = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def forward_backward(self, model_id: str, *args: object) -> object:
        if model_id == self.model_id:
            self.entered.set()
            if not self.release.wait(timeout=300):
                raise TimeoutError("BlockingBackend was never released")
        return self.inner.forward_backward(model_id, *args)  # type: ignore[arg-type]


def fb(data: list[p.Datum], loss_fn: str = "cross_entropy", forward_only: bool = False,
       **config: float) -> p.ForwardBackward:
    return p.ForwardBackward(data=data, loss_fn=loss_fn, loss_fn_config=dict(config), forward_only=forward_only)


def adam(lr: float = 1e-2, **kw: float) -> p.OptimStep:
    return p.OptimStep(adam_params=p.AdamParams(learning_rate=lr, **kw))


def logprobs_of(result: dict) -> list[np.ndarray]:
    return [o["logprobs"].numpy() for o in msgspec.convert(result, p.ForwardBackwardResult).outputs]


class BusHarness:
    """The real worker (run_trainer) as an asyncio task, a producer, and a reader of replies and dead letters."""

    def __init__(self, settings: BusSettings, config: TrainerConfig | None = None,
                 backend: TrainingBackend | None = None):
        self.settings = settings
        self.config = config or TrainerConfig()
        self.backend = backend
        self.replies: dict[str, list[p.Result]] = {}
        self.dead_letters: list[tuple[Envelope, p.DeadLetter]] = []
        self._changed = asyncio.Event()

    async def __aenter__(self) -> BusHarness:
        from bus_runtime.kafka_io import make_consumer, make_producer
        from trainer_consumer.worker import run_trainer

        ready = asyncio.Event()
        self.worker = asyncio.create_task(run_trainer(self.settings, ready=ready, config=self.config,
                                                      backend=self.backend))
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.reader = make_consumer(self.settings, self.settings.topics.replies, self.settings.topics.dead_letter,
                                    group_id=f"reader-{uuid.uuid4().hex[:6]}")
        await self.reader.start()
        self._reading = asyncio.create_task(self._read())
        async with asyncio.timeout(60):
            await asyncio.wait({self.worker, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if self.worker.done():
            self.worker.result()  # raises the worker's startup error
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self.worker, self._reading):
            task.cancel()
        for task in (self.worker, self._reading):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.reader.stop()
        await self.producer.stop()

    async def _read(self) -> None:
        objects = open_object_store(self.settings)
        while True:
            for records in (await self.reader.getmany(timeout_ms=100)).values():
                for record in records:
                    env = decode_envelope(record.value)
                    body = await asyncio.to_thread(decode_payload, env, objects)
                    if env.type == EventType.DEAD_LETTER:
                        self.dead_letters.append((env, body))
                    else:
                        self.replies.setdefault(env.request_id, []).append(body)
                    self._changed.set()

    async def publish(self, event_type: EventType, payload: object, model_id: str, seq_id: int | None,
                      request_id: str | None = None) -> str:
        env, body = make_event(event_type, payload, model_id=model_id, seq_id=seq_id,  # type: ignore[arg-type]
                               request_id=request_id)
        raw = await asyncio.to_thread(encode_event, env, body, blob_store=open_object_store(self.settings),
                                      claim_check_bytes=self.settings.claim_check_bytes)  # big ones via S3
        await self.publish_raw(raw, model_id)
        return env.request_id

    async def publish_raw(self, raw: bytes, key: str) -> None:
        await self.producer.send_and_wait(self.settings.topics.train, raw, key=key.encode())

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.worker.done():
                    self.worker.result()
                    raise AssertionError("the worker stopped")
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._changed.wait()

    async def reply(self, request_id: str, timeout: float = 60.0) -> p.Result:
        await self.wait_for(lambda: request_id in self.replies, timeout)
        return self.replies[request_id][0]

    async def ok(self, request_id: str) -> dict:
        result = await self.reply(request_id)
        assert result.error is None, result.error
        assert result.result is not None
        return result.result

    def sampler_weights(self, model_id: str, name: str) -> dict[str, torch.Tensor]:
        store = CheckpointStore(open_object_store(self.settings))
        return store.load(TinkerPath(model_id, "sampler_weights", name)).adapter_weights


def bus_settings(settings: BusSettings, base_model: str, **overrides: object) -> BusSettings:
    """The fixture's settings serving `base_model`, with a trainer group of their own."""
    return replace(settings, base_models=(base_model,), trainer_group=f"trainers-{settings.topics.prefix}",
                   **overrides)  # type: ignore[arg-type]
