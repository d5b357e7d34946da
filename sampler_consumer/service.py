"""From decoded Sample events to Result payloads: sessions, validation, adapters, the engine core.

`prepare` does the blocking part (S3: sessions, adapter checkpoints) and runs off the event loop; `submit`
hands the typed requests to the engine thread and returns at once; the reply callback fires exactly once per
job, on the engine thread. Every request gets exactly one result: a SampleResult, a "user" error (unknown
session, bad prompt, bad adapter) or a "server" error, whose message is never empty.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from artifact_store import CheckpointStore, ObjectStore, Registry, SamplingSession
from bus_events import Envelope, Reply, make_result, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.errors import UserError
from bus_runtime.settings import BusSettings, open_object_store
from sampler_consumer.adapter_cache import AdapterCache, AdapterNotFound
from sampler_consumer.config import SamplerConfig, resolve_device, resolve_dtype
from sampler_consumer.engine_core import EngineCore, ModelEngine
from sampler_consumer.lora import AdapterError
from sampler_consumer.metrics import SamplerMetrics
from sampler_consumer.models import load_base_model
from sampler_consumer.requests import GenFailure, GenOutput, GenRequest, Sequence, describe
from sampler_consumer.stops import StopSpecError, check_stop_spec

log = logging.getLogger(__name__)



@dataclass
class SampleJob:
    env: Envelope
    request: p.Sample


@dataclass
class Prepared:
    """A job ready for the engine: its base model and its pieces (num_samples split to fit a batch), or the
    error that answers it."""

    job: SampleJob
    base_model: str = ""
    pieces: list[GenRequest] = field(default_factory=list)
    error: p.ErrorInfo | None = None


def _prompt_tokens(request: p.Sample) -> list[int]:
    prompt = request.prompt
    if prompt.dtype not in ("int32", "int64") or len(prompt.shape) != 1:
        raise UserError(f"prompt must be a 1-D int32/int64 tensor of token ids, got {prompt.dtype} {prompt.shape}")
    if prompt.numel == 0:
        raise UserError("prompt is empty: sampling needs at least one token")
    return [int(t) for t in prompt.numpy()]


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> p.TopkLogprobs:
    return p.TopkLogprobs(token_ids=tensor_from_numpy(ids, "int32"), logprobs=tensor_from_numpy(logprobs, "float32"))


def _sequence(seq: Sequence, topk_sample_logprobs: int) -> p.SampledSequence:
    topk = None
    if topk_sample_logprobs:
        k = topk_sample_logprobs
        ids = np.stack([i for i, _ in seq.topk]) if seq.topk else np.zeros((0, k), dtype=np.int32)
        values = np.stack([v for _, v in seq.topk]) if seq.topk else np.zeros((0, k), dtype=np.float32)
        topk = _topk(ids, values)
    return p.SampledSequence(tokens=tensor_from_numpy(np.asarray(seq.tokens, dtype=np.int32)),
                             logprobs=tensor_from_numpy(np.asarray(seq.logprobs, dtype=np.float32)),
                             stop_reason=seq.stop_reason, topk_logprobs=topk)


def _to_result(out: GenOutput, topk_sample_logprobs: int = 0) -> p.SampleResult:
    topk = None
    if out.topk_ids is not None and out.topk_logprobs is not None:
        topk = _topk(out.topk_ids, out.topk_logprobs)
    alt = None
    if out.alt_tokens is not None and out.alt_logprobs is not None:
        alt = p.PromptAltTokens(tokens=tensor_from_numpy(out.alt_tokens, "int32"),
                                logprobs=tensor_from_numpy(out.alt_logprobs, "float32"))
    return p.SampleResult(
        sequences=[_sequence(s, topk_sample_logprobs) for s in out.sequences],
        prompt_logprobs=None if out.prompt_logprobs is None else tensor_from_numpy(out.prompt_logprobs),
        topk_prompt_logprobs=topk,
        prompt_cache_hit_tokens=out.prompt_cache_hit_tokens,
        target_prompt_logprobs=None if out.target_logprobs is None else tensor_from_numpy(out.target_logprobs),
        prompt_alt_tokens=alt,
    )


class _Merge:
    """Collects the pieces of one job (engine thread) and replies once, when the last one is in."""

    def __init__(self, prepared: Prepared, reply: Callable[[Reply], None]) -> None:
        self.prepared, self.reply = prepared, reply
        self.parts: list[GenOutput | GenFailure | None] = [None] * len(prepared.pieces)
        self.missing = len(prepared.pieces)
        self.lock = threading.Lock()
        # Handed to the engine now: the reply's started_at (the engine's own queue counts as compute).
        self.started = time.time()

    def piece_done(self, index: int, result: GenOutput | GenFailure) -> None:
        with self.lock:
            self.parts[index] = result
            self.missing -= 1
            if self.missing:
                return
        env = self.prepared.job.env
        failure = next((r for r in self.parts if isinstance(r, GenFailure)), None)
        if failure is not None:
            self.reply(make_result(env, error=p.ErrorInfo(message=failure.message, category=failure.category),
                                   started_at=self.started))
            return
        outputs: list[GenOutput] = self.parts  # type: ignore[assignment]
        # Everything but the sequences is the prompt's, computed by the first piece (see SamplerService._prepare).
        merged = dataclasses.replace(outputs[0], sequences=[s for out in outputs for s in out.sequences])
        self.reply(make_result(env, _to_result(merged, self.prepared.job.request.topk_sample_logprobs),
                               started_at=self.started))


class SamplerService:
    def __init__(self, settings: BusSettings, config: SamplerConfig, objects: ObjectStore | None = None,
                 metrics: SamplerMetrics | None = None) -> None:
        self.metrics = metrics
        self.objects = objects or open_object_store(settings)
        self.registry = Registry(self.objects)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.config = config.resolved(self.device)
        self.adapters = AdapterCache(CheckpointStore(self.objects), self.config.adapter_cache_size)
        self.core = EngineCore(self._load_engine, capacity=self.config.base_model_cache_size)

    def _load_engine(self, name: str) -> ModelEngine:  # on the engine thread
        base = load_base_model(name, self.device, self.dtype, adapter_slots=self.config.adapter_cache_size,
                               max_lora_rank=self.config.max_lora_rank)
        return ModelEngine(base, self.config, self.metrics)

    def close(self) -> None:
        self.core.stop()

    # ------------------------------------------------------------------ blocking: S3
    def prepare(self, jobs: list[SampleJob]) -> list[Prepared]:
        """Sessions and adapters of `jobs` (one registry read per session, one adapter lookup per path)."""
        sessions = {sid: self.registry.get_sampling_session(sid)
                    for sid in {job.request.sampling_session_id for job in jobs}}
        adapters: dict[tuple[str, str], object] = {}
        return [self._prepare(job, sessions, adapters) for job in jobs]

    def _prepare(self, job: SampleJob, sessions: dict[str, SamplingSession | None],
                 adapters: dict[tuple[str, str], object]) -> Prepared:
        request = job.request
        session = sessions.get(request.sampling_session_id)
        try:
            if session is None or session.tenant != job.env.tenant:
                raise UserError(f"unknown sampling session {request.sampling_session_id!r}")
            tokens = _prompt_tokens(request)
            try:
                check_stop_spec(request.sampling_params.stop)
            except StopSpecError as exc:
                raise UserError(str(exc)) from exc
            adapter = None
            if session.model_path is not None:
                where = (session.model_path, session.base_model)
                if self.metrics is not None:  # one lookup per request, however the batch shares loads
                    self.metrics.cache_lookup("adapter", where in adapters or self.adapters.holds(*where))
                if where not in adapters:
                    try:
                        adapters[where] = self.adapters.get(session.model_path, session.base_model)
                    except Exception as exc:
                        adapters[where] = exc
                adapter = adapters[where]
                if isinstance(adapter, Exception):
                    raise adapter
        except (UserError, AdapterNotFound, AdapterError) as exc:
            return Prepared(job, error=p.ErrorInfo(message=str(exc), category="user"))
        except Exception as exc:  # corrupt checkpoint, S3 trouble: our side
            log.exception("preparing sample request %s failed", job.env.request_id)
            return Prepared(job, error=p.ErrorInfo(message=f"loading {session.model_path if session else '?'} "
                                                           f"failed: {describe(exc)}", category="server"))
        rows = self.config.max_batch_rows
        target = request.target_prompt_logprobs
        pieces = [GenRequest(prompt=tokens, params=request.sampling_params, adapter=adapter, first_sample=first,
                             num_samples=min(rows, request.num_samples - first),
                             prompt_logprobs=request.prompt_logprobs and first == 0,
                             topk_prompt_logprobs=request.topk_prompt_logprobs if first == 0 else 0,
                             topk_sample_logprobs=request.topk_sample_logprobs,
                             target_prompt_ids=None if target is None or first else target.numpy(),
                             prompt_alt_tokens_k=0 if first else request.prompt_alt_tokens_k,
                             cache_namespace=job.env.tenant)
                  for first in range(0, request.num_samples, rows)]
        return Prepared(job, session.base_model, pieces)

    # ------------------------------------------------------------------ non-blocking: the engine
    def submit(self, prepared: Prepared, reply: Callable[[Reply], None]) -> None:
        """Hand `prepared` to the engine; `reply` gets its (envelope, result) once (on the engine thread, or here
        for a job that `prepare` already answered)."""
        if prepared.error is not None or not prepared.pieces:
            error = prepared.error or p.ErrorInfo(message="num_samples must be at least 1", category="user")
            reply(make_result(prepared.job.env, error=error))
            return
        merge = _Merge(prepared, reply)
        for index, piece in enumerate(prepared.pieces):
            self.core.submit(prepared.base_model, piece, functools.partial(merge.piece_done, index))

    def run_batch(self, jobs: list[SampleJob]) -> list[Reply]:
        """Blocking convenience (tests, tools): one reply per job, in job order."""
        futures: list[Future] = []
        for prepared in self.prepare(jobs):
            future: Future = Future()
            self.submit(prepared, future.set_result)
            futures.append(future)
        return [future.result() for future in futures]
