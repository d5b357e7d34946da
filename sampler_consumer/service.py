"""From decoded Sample events to Result payloads: sessions, validation, adapters, batching, the engine.

Blocking (S3 and torch); the worker runs `SamplerService.run_batch` in a thread. Every request gets exactly
one result: a SampleResult, a "user" error (unknown session, bad prompt, bad adapter) or a "server" error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from artifact_store import CheckpointStore, ObjectStore, Registry, SamplingSession
from bus_events import Envelope, make_result, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.settings import BusSettings, open_object_store
from sampler_consumer.adapter_cache import AdapterCache, AdapterNotFound
from sampler_consumer.config import SamplerConfig, resolve_cache_mode, resolve_device, resolve_dtype
from sampler_consumer.engine import Engine, GenOutput, GenRequest
from sampler_consumer.lora import AdapterError, LoraAdapter
from sampler_consumer.models import BaseModel, ModelPool, load_base_model
from sampler_consumer.stops import StopSpecError, check_stop_spec

log = logging.getLogger(__name__)


class UserError(ValueError):
    """The request cannot be served as asked; answered with category "user"."""


@dataclass
class SampleJob:
    env: Envelope
    request: p.Sample


@dataclass
class Runner:
    """A loaded base model with its engine and adapter cache."""

    base: BaseModel
    engine: Engine
    adapters: AdapterCache


@dataclass
class _Piece:
    """Samples [first, first+count) of one job: the unit packed into engine batches."""

    job: int
    first: int
    count: int
    prompt: list[int]
    adapter: LoraAdapter | None


def _prompt_tokens(request: p.Sample) -> list[int]:
    prompt = request.prompt
    if prompt.dtype not in ("int32", "int64") or len(prompt.shape) != 1:
        raise UserError(f"prompt must be a 1-D int32/int64 tensor of token ids, got {prompt.dtype} {prompt.shape}")
    if prompt.numel == 0:
        raise UserError("prompt is empty: sampling needs at least one token")
    return [int(t) for t in prompt.numpy()]


def _check_against_model(request: p.Sample, tokens: list[int], base: BaseModel) -> None:
    bad = [t for t in tokens if not 0 <= t < base.vocab_size]
    if bad:
        raise UserError(f"prompt holds token ids outside the vocabulary [0, {base.vocab_size}): {bad[:5]}")
    if len(tokens) + request.sampling_params.max_tokens > base.max_positions:
        raise UserError(f"prompt ({len(tokens)} tokens) + sampling_params.max_tokens "
                        f"({request.sampling_params.max_tokens}) exceeds the model's context of {base.max_positions}")
    if not 0 <= request.topk_prompt_logprobs <= base.vocab_size:
        raise UserError(f"topk_prompt_logprobs must be in [0, {base.vocab_size}], got {request.topk_prompt_logprobs}")
    try:
        check_stop_spec(request.sampling_params.stop)
    except StopSpecError as exc:
        raise UserError(str(exc)) from exc


def _to_result(out: GenOutput) -> p.SampleResult:
    topk = None
    if out.topk_ids is not None and out.topk_logprobs is not None:
        topk = p.TopkLogprobs(token_ids=tensor_from_numpy(out.topk_ids), logprobs=tensor_from_numpy(out.topk_logprobs))
    return p.SampleResult(
        sequences=[
            p.SampledSequence(tokens=tensor_from_numpy(np.asarray(s.tokens, dtype=np.int32)),
                              logprobs=tensor_from_numpy(np.asarray(s.logprobs, dtype=np.float32)),
                              stop_reason=s.stop_reason)
            for s in out.sequences
        ],
        prompt_logprobs=None if out.prompt_logprobs is None else tensor_from_numpy(out.prompt_logprobs),
        topk_prompt_logprobs=topk,
    )


class SamplerService:
    def __init__(self, settings: BusSettings, config: SamplerConfig, objects: ObjectStore | None = None) -> None:
        self.config = config
        self.objects = objects or open_object_store(settings)
        self.registry = Registry(self.objects)
        self.checkpoints = CheckpointStore(self.objects)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.cache_mode, self.compiled = resolve_cache_mode(config, self.device)
        self.runners: ModelPool[Runner] = ModelPool(config.base_model_cache_size, self._load_runner)

    def _load_runner(self, name: str) -> Runner:
        base = load_base_model(name, self.device, self.dtype)
        engine = Engine(base, self.cache_mode, self.compiled, self.config.prompt_logprob_chunk,
                        self.config.compile_mode)
        return Runner(base, engine, AdapterCache(self.checkpoints, base.lora, name, self.config.adapter_cache_size))

    # ------------------------------------------------------------------ entry point
    def run_batch(self, jobs: list[SampleJob]) -> list[tuple[Envelope, p.Result]]:
        """One reply per job, in job order."""
        outcomes: dict[int, GenOutput | p.ErrorInfo] = {}
        sessions = self._sessions({job.request.sampling_session_id for job in jobs})
        groups: dict[str, list[tuple[int, list[int], SamplingSession]]] = {}
        for i, job in enumerate(jobs):
            try:
                session = sessions.get(job.request.sampling_session_id)
                if session is None or session.tenant != job.env.tenant:
                    raise UserError(f"unknown sampling session {job.request.sampling_session_id!r}")
                groups.setdefault(session.base_model, []).append((i, _prompt_tokens(job.request), session))
            except UserError as exc:
                outcomes[i] = p.ErrorInfo(message=str(exc), category="user")
        for base_model, members in groups.items():
            self._run_group(base_model, members, jobs, outcomes)
        return [self._reply(job, outcomes[i]) for i, job in enumerate(jobs)]

    @staticmethod
    def _reply(job: SampleJob, outcome: GenOutput | p.ErrorInfo) -> tuple[Envelope, p.Result]:
        if isinstance(outcome, p.ErrorInfo):
            return make_result(job.env, error=outcome)
        return make_result(job.env, _to_result(outcome))

    def _sessions(self, ids: set[str]) -> dict[str, SamplingSession | None]:
        # Re-read on every batch: cheap, and never stale if a session is (re)written.
        return {sid: self.registry.get_sampling_session(sid) for sid in ids}

    # ------------------------------------------------------------------ one base model
    def _run_group(self, base_model: str, members: list[tuple[int, list[int], SamplingSession]],
                   jobs: list[SampleJob], outcomes: dict[int, GenOutput | p.ErrorInfo]) -> None:
        try:
            runner = self.runners.get(base_model)
        except (OSError, ValueError) as exc:  # no such model / unreadable folder
            log.warning("cannot load base model %s: %s", base_model, exc)
            for i, _, _ in members:
                outcomes[i] = p.ErrorInfo(message=f"base model {base_model!r} cannot be loaded: {exc}",
                                          category="user")
            return
        pieces: list[_Piece] = []
        adapters: dict[str, LoraAdapter] = {}
        for i, tokens, session in members:
            request = jobs[i].request
            try:
                _check_against_model(request, tokens, runner.base)
                adapter = None
                if session.model_path is not None:
                    if session.model_path not in adapters:
                        adapters[session.model_path] = runner.adapters.get(session.model_path)
                    adapter = adapters[session.model_path]
            except (UserError, AdapterNotFound, AdapterError) as exc:
                outcomes[i] = p.ErrorInfo(message=str(exc), category="user")
                continue
            except Exception as exc:  # corrupt checkpoint, S3 trouble: our side
                log.exception("loading the adapter of %s failed", session.sampling_session_id)
                outcomes[i] = p.ErrorInfo(message=f"loading {session.model_path} failed: {exc}", category="server")
                continue
            for first in range(0, request.num_samples, self.config.max_batch_rows):
                count = min(self.config.max_batch_rows, request.num_samples - first)
                pieces.append(_Piece(i, first, count, tokens, adapter))
        # Similar prompt lengths together: less left padding in each prefill.
        pieces.sort(key=lambda piece: len(piece.prompt))
        partial: dict[int, GenOutput] = {}
        for chunk in self._chunks(pieces, runner.adapters.capacity):
            self._run_chunk(runner, chunk, jobs, partial, outcomes)
        for i, output in partial.items():
            if i not in outcomes:
                outcomes[i] = output

    def _chunks(self, pieces: list[_Piece], max_adapters: int) -> Iterator[list[_Piece]]:
        chunk: list[_Piece] = []
        rows, keys = 0, set()
        for piece in pieces:
            key = piece.adapter.key if piece.adapter else None
            if chunk and (rows + piece.count > self.config.max_batch_rows
                          or (key is not None and key not in keys and len(keys) >= max_adapters)):
                yield chunk
                chunk, rows, keys = [], 0, set()
            chunk.append(piece)
            rows += piece.count
            if key is not None:
                keys.add(key)
        if chunk:
            yield chunk

    def _run_chunk(self, runner: Runner, chunk: list[_Piece], jobs: list[SampleJob],
                   partial: dict[int, GenOutput], outcomes: dict[int, GenOutput | p.ErrorInfo]) -> None:
        requests = []
        for piece in chunk:
            request = jobs[piece.job].request
            requests.append(GenRequest(
                prompt=piece.prompt, params=request.sampling_params, adapter=piece.adapter, first_sample=piece.first,
                num_samples=piece.count, prompt_logprobs=request.prompt_logprobs and piece.first == 0,
                topk_prompt_logprobs=request.topk_prompt_logprobs if piece.first == 0 else 0))
        try:
            runner.adapters.trim(in_use={piece.adapter.key for piece in chunk if piece.adapter})
            outputs = runner.engine.generate(requests)
        except Exception as exc:
            log.exception("generation failed for a batch of %d pieces", len(chunk))
            for piece in chunk:
                outcomes[piece.job] = p.ErrorInfo(message=f"sampling failed: {exc}", category="server")
            return
        for piece, output in zip(chunk, outputs, strict=True):
            merged = partial.setdefault(piece.job, GenOutput(sequences=[None] * jobs[piece.job].request.num_samples))
            merged.sequences[piece.first:piece.first + piece.count] = output.sequences
            if piece.first == 0:
                merged.prompt_logprobs = output.prompt_logprobs
                merged.topk_ids, merged.topk_logprobs = output.topk_ids, output.topk_logprobs
