"""The gateway's submission layer: one typed operation per request kind, shared by the Tinker API and the JSON
API, which only parse their bodies, call an operation and render its future.

Every operation hands `Gateway.submit` the payload class (which names the event type) and a `build` step that
parses the request into that bus payload. `build` runs only when the request is not a retry, and a FieldError
from it (or from the operation's own check) voids a training seq_id, so the trainer does not wait for it.
The caller has already checked that the model or sampling session is the caller's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import numpy as np
from litestar.exceptions import TooManyRequestsException

from artifact_store import SamplingSession
from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_gateway.errors import FieldError
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.schemas import AdamParamsIn, EncodedTextChunk, ModelInputChunk, SamplingParamsIn
from bus_gateway.validation import (
    build,
    check_token_ids,
    text_only,
    validate_forward_backward,
    validate_prompt,
)

S = TypeVar("S", bound=msgspec.Struct)
Build = Callable[[], S | Awaitable[S]]

ADAM_TYPES = (None, "adam", "adamw")
DEFAULT_MAX_TOKENS = 128
SEED_MODULUS = 2**63 - 1  # the real service folds any 64-bit seed into [0, 2**63 - 1)


# ------------------------------------------------------------------ parts both APIs parse the same way
def require_served(gw: Gateway, base_model: str, field: str = "base_model") -> None:
    if not gw.base_models.is_served(base_model):
        raise FieldError(field, f"{base_model!r} is not served here (served: {', '.join(gw.settings.base_models)})")


def prompt_tokens(chunks: Sequence[ModelInputChunk], field: str = "prompt") -> np.ndarray:
    """The token ids of a ModelInput's chunks (text-only models: encoded_text chunks only)."""
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, EncodedTextChunk):
            raise text_only(f"{field}.chunks[{i}]", str(chunk.__struct_config__.tag))
        tokens.extend(chunk.tokens)
    try:
        return np.asarray(tokens, dtype=np.int64)
    except OverflowError as exc:
        raise FieldError(field, "token ids must fit in 64 bits") from exc


def adam_params(params: AdamParamsIn | None, field: str = "adam_params") -> p.AdamParams:
    """The wire AdamParams, field by field from the HTTP body (the wire struct's own checks apply)."""
    params = params or AdamParamsIn()
    if params.type not in ADAM_TYPES:
        raise FieldError(f"{field}.type", f"optimizer {params.type!r} is not served here (adamw; the Tinker API's "
                                          "optim_step also takes dimuon)")
    return build(p.AdamParams, field, **{name: getattr(params, name) for name in p.AdamParams.__struct_fields__})


def optim_step_payload(params: AdamParamsIn | None, field: str = "adam_params") -> p.OptimStep:
    """The wire OptimStep of an optim_step body: Dimuon's parameters when `type` is "dimuon", else AdamW's."""
    if params is not None and params.type == "dimuon":
        return p.OptimStep(dimuon_params=build(p.DimuonParams, field, learning_rate=params.learning_rate,
                                               grad_clip_norm=params.grad_clip_norm, beta1=params.beta1))
    return p.OptimStep(adam_params=adam_params(params, field))


def sampling_params(params: SamplingParamsIn, vocab_size: int) -> p.SamplingParams:
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    for i, item in enumerate(stop or []):
        if isinstance(item, int):
            check_token_ids(np.array([item]), vocab_size, f"sampling_params.stop[{i}]")
    return build(p.SamplingParams, "sampling_params",
                 max_tokens=DEFAULT_MAX_TOKENS if params.max_tokens is None else params.max_tokens,
                 temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                 seed=None if params.seed is None else params.seed % SEED_MODULUS, stop=stop)


# ------------------------------------------------------------------ training operations (train topic)
async def create_model(gw: Gateway, tenant: str, model_id: str, payload: Build[p.CreateModel],
                       context: dict[str, Any] | None = None) -> Future:
    """Seq 0 of a new model: a duplicate create (same model id) gets the first one's future."""
    return await gw.submit(p.CreateModel, payload, model_id=model_id, seq_id=0, tenant=tenant,
                           check=lambda create: require_served(gw, create.base_model), context=context)


async def load_weights(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                       payload: Build[p.LoadWeights]) -> Future:
    return await gw.submit(p.LoadWeights, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)


async def forward_backward(gw: Gateway, tenant: str, model_id: str, seq_id: int | None, base_model: str,
                           payload: Build[p.ForwardBackward], context: dict[str, Any] | None = None) -> Future:
    async def valid(fb: p.ForwardBackward) -> None:
        validate_forward_backward(fb, (await gw.base_models.info(base_model)).vocab_size)

    return await gw.submit(p.ForwardBackward, payload, model_id=model_id, seq_id=seq_id, tenant=tenant, check=valid,
                           context=context)


async def optim_step(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                     payload: Build[p.OptimStep]) -> Future:
    return await gw.submit(p.OptimStep, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)


async def save_weights(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                       payload: Build[p.SaveWeights]) -> Future:
    return await gw.submit(p.SaveWeights, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)


async def save_weights_for_sampler(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                                   payload: Build[p.SaveWeightsForSampler]) -> Future:
    return await gw.submit(p.SaveWeightsForSampler, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)


async def save_weights_external(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                                payload: Build[p.SaveWeightsExternal]) -> Future:
    return await gw.submit(p.SaveWeightsExternal, payload, model_id=model_id, seq_id=seq_id, tenant=tenant)


async def unload(gw: Gateway, tenant: str, model_id: str) -> Future:
    return await gw.submit(p.UnloadModel, p.UnloadModel, model_id=model_id, seq_id=None, tenant=tenant)


# ------------------------------------------------------------------ sampling (sample topic)
@dataclass(frozen=True)
class SampleInput:
    """A sample request as both APIs parse it, before the base model's facts turn it into a bus Sample."""

    prompt: np.ndarray
    num_samples: int
    params: SamplingParamsIn
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    prompt_field: str = "prompt"
    context: dict[str, Any] = field(default_factory=dict)
    topk_sample_logprobs: int = 0
    target_prompt_ids: np.ndarray | None = None  # int64 [P - 1, K], -1 = nothing asked
    prompt_alt_tokens_k: int = 0
    stream: bool = False  # the sampler also publishes sample_delta events (bus_gateway.streams)


async def sample(gw: Gateway, tenant: str, session: SamplingSession, request: SampleInput,
                 seq_id: int | None = None) -> Future:
    """Keyed by the sampling session; 429 (the SDK backs off and resends the same seq_id) beyond the gateway's
    limit of pending samples."""

    async def payload() -> p.Sample:
        if gw.futures.local_pending_samples >= gw.config.max_inflight_samples:
            raise TooManyRequestsException(
                detail=f"{gw.futures.local_pending_samples} sample requests in flight; retry shortly",
                headers={"retry-after": "1"})
        info = await gw.base_models.info(session.base_model)
        wire_params = sampling_params(request.params, info.vocab_size)
        validate_prompt(request.prompt, info.vocab_size, info.max_positions, wire_params.max_tokens,
                        request.prompt_field)
        for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
            if getattr(request, name) > info.vocab_size:
                raise FieldError(name, f"must be at most the vocabulary size {info.vocab_size}")
        problem = p.prompt_output_problem(request.prompt.size, request.target_prompt_ids,
                                          request.prompt_alt_tokens_k, info.vocab_size)
        if problem is not None:
            raise FieldError(problem.split(" ", 1)[0], problem)
        target = request.target_prompt_ids
        return build(p.Sample, "num_samples", sampling_session_id=session.sampling_session_id,
                     prompt=tensor_from_numpy(request.prompt, "int32"), num_samples=request.num_samples,
                     sampling_params=wire_params, prompt_logprobs=request.prompt_logprobs,
                     topk_prompt_logprobs=request.topk_prompt_logprobs,
                     topk_sample_logprobs=request.topk_sample_logprobs,
                     target_prompt_logprobs=None if target is None else tensor_from_numpy(target, "int64"),
                     prompt_alt_tokens_k=request.prompt_alt_tokens_k, stream=request.stream)

    return await gw.submit(p.Sample, payload, model_id=session.sampling_session_id, seq_id=seq_id, tenant=tenant,
                           context=request.context)
