"""Sampling endpoints (tinker-protocol.md 2.3): sampling sessions live in the Registry; asample publishes one
event on the sample topic keyed by the sampling session id and answers a promise with sample_sequence_ids."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
from litestar import get, post
from litestar.exceptions import TooManyRequestsException
from litestar.params import JSONBody

from artifact_store import CheckpointNotFound, SamplingSession
from bus_events import EventType, tensor_from_numpy
from bus_events import payloads as p
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.futures import Future
from bus_gateway.results import sample_sequence_ids
from bus_gateway.state import Gateway
from bus_gateway.tinker_api.common import build, first_request, parse_path, promise, sampling_session_id_for
from bus_gateway.tinker_api.schemas import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    EncodedTextChunk,
    SampleRequest,
    SamplerInfo,
    SamplingParamsIn,
    UntypedFuture,
)
from bus_gateway.validation import check_token_ids, validate_prompt

DEFAULT_MAX_TOKENS = 128
SEED_MODULUS = 2**63 - 1  # the real service folds any 64-bit seed into [0, 2**63 - 1)


async def resolve_model_path(gw: Gateway, tenant: str, model_path: str, field: str = "model_path") -> str:
    """The base model of an owned checkpoint (sampler or training state; both hold a PEFT adapter)."""
    path = parse_path(model_path, field)
    try:
        await gw.run(path.run_id, tenant)
        return (await asyncio.to_thread(gw.checkpoints.info, path)).base_model
    except (NotFound, CheckpointNotFound) as exc:
        raise FieldError(field, f"no checkpoint {path} (or it is not yours)", status_code=404) from exc


async def sampling_target(gw: Gateway, tenant: str, base_model: str | None,
                          model_path: str | None) -> tuple[str, str | None]:
    """(base model, checkpoint path or None) for sampling `model_path`, or the bare `base_model`."""
    if model_path is not None:
        base = await resolve_model_path(gw, tenant, model_path)
        if base_model is not None and base_model != base:
            raise FieldError("base_model", f"{model_path} was trained on {base!r}, not {base_model!r}")
        return base, str(parse_path(model_path, "model_path"))
    if base_model is None:
        raise FieldError("base_model", "give base_model or model_path")
    if not gw.base_models.is_served(base_model):
        raise FieldError("base_model", f"{base_model!r} is not served here (served: "
                                       f"{', '.join(gw.settings.base_models)})")
    return base_model, None


async def adhoc_sampling_session(gw: Gateway, tenant: str, base_model: str | None,
                                 model_path: str | None) -> SamplingSession:
    """Clients that address a model directly (older SDKs, the JSON API) get a stable per-target session."""
    base, path = await sampling_target(gw, tenant, base_model, model_path)
    digest = hashlib.sha256(f"{tenant}\0{base}\0{path}".encode()).hexdigest()[:20]
    session_id = sampling_session_id_for(f"adhoc-{digest}", 0)
    try:
        return await gw.sampling_session(session_id, tenant)
    except NotFound:
        session = SamplingSession(sampling_session_id=session_id, base_model=base, tenant=tenant, model_path=path)
        await gw.put_sampling_session(session)
        return session


@post("/api/v1/create_sampling_session", status_code=200, tags=["sampling"])
async def create_sampling_session(data: JSONBody[CreateSamplingSessionRequest], gw: GatewayDep,
                                  tenant: TenantDep) -> CreateSamplingSessionResponse:
    await gw.session(data.session_id, tenant)
    base, path = await sampling_target(gw, tenant, data.base_model, data.model_path)
    session_id = sampling_session_id_for(data.session_id, data.sampling_session_seq_id)
    await gw.put_sampling_session(SamplingSession(sampling_session_id=session_id, base_model=base, tenant=tenant,
                                                  model_path=path))
    return CreateSamplingSessionResponse(sampling_session_id=session_id)


@get("/api/v1/samplers/{sampler_id:str}", tags=["sampling"])
async def get_sampler(sampler_id: PathId, gw: GatewayDep, tenant: TenantDep) -> SamplerInfo:
    session = await gw.sampling_session(sampler_id, tenant)
    return SamplerInfo(sampler_id=session.sampling_session_id, base_model=session.base_model,
                       model_path=session.model_path)


def sampling_params(params: SamplingParamsIn, vocab_size: int) -> p.SamplingParams:
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    for i, item in enumerate(stop or []):
        if isinstance(item, int):
            check_token_ids(np.array([item]), vocab_size, f"sampling_params.stop[{i}]")
    return build(p.SamplingParams, "sampling_params",
                 max_tokens=DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens,
                 temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                 seed=None if params.seed is None else params.seed % SEED_MODULUS, stop=stop)


async def submit_sample(gw: Gateway, tenant: str, session: SamplingSession, prompt: np.ndarray, num_samples: int,
                        params: SamplingParamsIn, *, seq_id: int | None = None, prompt_logprobs: bool = False,
                        topk_prompt_logprobs: int = 0, context: dict[str, Any] | None = None,
                        prompt_field: str = "prompt") -> Future:
    session_id = session.sampling_session_id
    if (first := first_request(gw, session_id, seq_id, tenant)) is not None:
        return first
    if gw.futures.local_pending_samples >= gw.config.max_inflight_samples:
        raise TooManyRequestsException(
            detail=f"{gw.futures.local_pending_samples} sample requests in flight; retry shortly",
            headers={"retry-after": "1"})
    info = await gw.base_models.info(session.base_model)
    wire_params = sampling_params(params, info.vocab_size)
    validate_prompt(prompt, info.vocab_size, info.max_positions, wire_params.max_tokens, prompt_field)
    if topk_prompt_logprobs and topk_prompt_logprobs > info.vocab_size:
        raise FieldError("topk_prompt_logprobs", f"must be at most the vocabulary size {info.vocab_size}")
    payload = build(p.Sample, "num_samples", sampling_session_id=session_id,
                    prompt=tensor_from_numpy(prompt, "int32"), num_samples=num_samples,
                    sampling_params=wire_params, prompt_logprobs=prompt_logprobs,
                    topk_prompt_logprobs=topk_prompt_logprobs)
    return await gw.submit(EventType.SAMPLE, payload, model_id=session_id, seq_id=seq_id, tenant=tenant,
                           context=context)


def prompt_tokens(data: SampleRequest) -> np.ndarray:
    tokens: list[int] = []
    for i, chunk in enumerate(data.prompt.chunks):
        if not isinstance(chunk, EncodedTextChunk):
            raise FieldError(f"prompt.chunks[{i}]", "only encoded_text chunks are supported (text-only models)")
        tokens.extend(chunk.tokens)
    try:
        return np.asarray(tokens, dtype=np.int64)
    except OverflowError as exc:
        raise FieldError("prompt", "token ids must fit in 64 bits") from exc


def _check_unsupported(data: SampleRequest) -> None:
    if data.topk_sample_logprobs:
        raise FieldError("topk_sample_logprobs", "top-k logprobs of sampled tokens are not supported")
    if data.target_prompt_logprobs is not None:
        raise FieldError("target_prompt_logprobs", "not supported")
    if data.prompt_alt_tokens_k:
        raise FieldError("prompt_alt_tokens_k", "not supported")
    if data.prompt_logprobs_last_n is not None and not (data.prompt_logprobs or data.topk_prompt_logprobs):
        raise FieldError("prompt_logprobs_last_n", "requires prompt_logprobs")


@post("/api/v1/asample", status_code=200, tags=["sampling"],
      summary="Sample; 429 asks the client to back off and resend the same seq_id")
async def asample(data: JSONBody[SampleRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    if data.sampling_session_id is not None:
        session = await gw.sampling_session(data.sampling_session_id, tenant)
    else:
        session = await adhoc_sampling_session(gw, tenant, data.base_model, data.model_path)
    _check_unsupported(data)
    fut = await submit_sample(
        gw, tenant, session, prompt_tokens(data), data.num_samples, data.sampling_params, seq_id=data.seq_id,
        prompt_logprobs=bool(data.prompt_logprobs), topk_prompt_logprobs=data.topk_prompt_logprobs,
        context={"prompt_logprobs_last_n": data.prompt_logprobs_last_n})
    return promise(fut, sample_sequence_ids(session.sampling_session_id, fut.seq_id, fut.request_id,
                                            data.num_samples))


ROUTES = [create_sampling_session, get_sampler, asample]
