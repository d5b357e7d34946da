"""Synchronous sampling for the JSON API (POST /sample, /generate, /api/v1/sample): text, token ids or chat
messages in; decoded text, tokens and logprobs out, once the sampler has answered."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
from litestar import Response, post
from litestar.params import JSONBody

from artifact_store import SamplingSession
from bus_events import payloads as p
from bus_events.ids import sampling_session_id_for, session_of_model
from bus_gateway import submit
from bus_gateway.chat_data import prompt_for_messages
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.json_api.schemas import JsonSample, JsonSampleResult, SampledText
from bus_gateway.results import failure, nan_to_none, sample_result
from bus_gateway.sampling_sessions import adhoc_sampling_session
from bus_gateway.tinker_api.schemas import ModelInput, SamplingParamsIn


async def _finished(gw: Gateway, fut: Future) -> bool:
    return await fut.wait(gw.config.sync_sample_timeout_s)


async def _current_weights_session(gw: Gateway, tenant: str, ref: str) -> SamplingSession | None:
    """Save the current weights of the model `ref` names for the sampler (in order with its training) and sample
    those."""
    model_id, _ = await gw.live_model(ref, tenant)
    try:
        await gw.live_run(model_id, tenant)
    except NotFound as exc:  # a name whose create_model the trainer has not applied: nothing to sample yet
        raise FieldError("model_id", f"adapter {ref!r} has no model on the trainer yet (its creation is on its "
                                     "way or failed): retry once a training call on it has completed", 409) from exc
    session_id = sampling_session_id_for(session_of_model(model_id), secrets.randbits(40))
    saved = await submit.save_weights_for_sampler(gw, tenant, model_id, None,
                                                  lambda: p.SaveWeightsForSampler(sampling_session_id=session_id))
    if not await _finished(gw, saved):
        return None
    failed = failure(saved)
    if failed is not None:
        raise FieldError("model_id", f"saving the current weights for sampling failed: {failed['error']}", 422)
    return await gw.sampling_session(session_id, tenant)


async def _prompt(gw: Gateway, data: JsonSample, base_model: str) -> np.ndarray:
    if data.messages is not None:
        tokenizer = await gw.base_models.tokenizer(base_model)
        messages = [{"role": m.role, "content": m.content} for m in data.messages]
        return await asyncio.to_thread(prompt_for_messages, tokenizer, messages)
    if isinstance(data.prompt, str):
        tokenizer = await gw.base_models.tokenizer(base_model)
        return np.asarray(await asyncio.to_thread(lambda: tokenizer(data.prompt)["input_ids"]), dtype=np.int64)
    if isinstance(data.prompt, ModelInput):
        return submit.prompt_tokens(data.prompt.chunks)
    if isinstance(data.prompt, list):
        return np.asarray(data.prompt, dtype=np.int64)
    raise FieldError("prompt", "give prompt (text or token ids) or messages")


@post(["/sample", "/generate", "/api/v1/sample"], status_code=200, tags=["json-api"],
      summary="Sample and wait for the result (202 with a request_id if it takes longer than the server waits)")
async def sample(data: JSONBody[JsonSample], gw: GatewayDep, tenant: TenantDep) -> Response[JsonSampleResult]:
    if data.sampling_session_id is not None:
        session = await gw.sampling_session(data.sampling_session_id, tenant)
    elif data.model_id is not None:
        current = await _current_weights_session(gw, tenant, data.model_id)
        if current is None:
            raise FieldError("model_id", "saving the model's current weights for sampling timed out", 503)
        session = current
    else:
        base = data.base_model if (data.base_model or data.model_path) else gw.settings.base_models[0]
        session = await adhoc_sampling_session(gw, tenant, base, data.model_path)
    prompt = await _prompt(gw, data, session.base_model)
    params = data.sampling_params or SamplingParamsIn(max_tokens=data.max_tokens, seed=data.seed, stop=data.stop,
                                                      temperature=data.temperature, top_k=data.top_k,
                                                      top_p=data.top_p)
    fut = await submit.sample(gw, tenant, session, submit.SampleInput(
        prompt=prompt, num_samples=data.num_samples, params=params, prompt_logprobs=data.prompt_logprobs))
    if not await _finished(gw, fut):
        return Response(JsonSampleResult(request_id=fut.request_id, status="pending"), status_code=202)
    failed = failure(fut)
    if failed is not None:
        return Response(JsonSampleResult(request_id=fut.request_id, status="failed", error=failed["error"],
                                         category=failed["category"]))
    result = sample_result(fut)
    tokenizer = await gw.base_models.tokenizer(session.base_model)
    sequences = [SampledText(text=tokenizer.decode(s.tokens.numpy().tolist(), skip_special_tokens=True),
                             tokens=s.tokens.numpy().tolist(), logprobs=s.logprobs.numpy().tolist(),
                             stop_reason=s.stop_reason) for s in result.sequences]
    prompt_logprobs = None
    if result.prompt_logprobs is not None:
        prompt_logprobs = nan_to_none(result.prompt_logprobs.numpy().tolist())
    return Response(JsonSampleResult(request_id=fut.request_id, status="complete",
                                     text=sequences[0].text if sequences else "", sequences=sequences,
                                     prompt_tokens=int(prompt.size), prompt_logprobs=prompt_logprobs))


ROUTES = [sample]
