"""The OpenAI-compatible endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}].
Same keys, tenants, sampler topic and sampling sessions as the Tinker API; `model` is a served base model or a
`tinker://<model_id>/sampler_weights/<name>` checkpoint of the caller's."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import numpy as np
from litestar import Response, get, post
from litestar.params import JSONBody, PathParameter
from litestar.response import Stream

from artifact_store import SamplingSession
from bus_gateway.chat_data import prompt_for_messages
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.gateway import Gateway
from bus_gateway.openai_api import generation as g
from bus_gateway.openai_api import sse
from bus_gateway.openai_api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, Sampling
from bus_gateway.openai_api.shapes import ChatShape, CompletionShape, Shape

OWNER = "tinker-bus"


def _message_text(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise FieldError(f"messages[{index}].content[{j}]", f"only text parts are supported (text-only models), "
                                                                f"got type {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def _refuse_chat_extras(data: ChatCompletionRequest) -> None:
    if data.tools:
        raise FieldError("tools", "tool calling is not supported")
    if data.response_format and data.response_format.get("type", "text") != "text":
        raise FieldError("response_format", "only the text format is supported")
    if data.top_logprobs:
        raise FieldError("top_logprobs", "alternatives per token are not supported; logprobs=true gives the "
                                         "sampled tokens' log probabilities")


async def _completion_prompts(tokenizer: Any, prompt: Any) -> tuple[list[np.ndarray], list[str | None]]:
    """OpenAI's four prompt forms (a string, strings, token ids, lists of token ids): tokens, and texts where
    given."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise FieldError("prompt", "give a string, a list of strings, a list of token ids or a list of those")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    tokens: list[np.ndarray] = []
    texts: list[str | None] = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            encoded = await asyncio.to_thread(tokenizer, item)
            tokens.append(np.asarray(encoded["input_ids"], dtype=np.int64))
            texts.append(item)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            tokens.append(np.asarray(item, dtype=np.int64))
            texts.append(None)  # decoded for echo once the sampler took the ids (they may be out of range)
        else:
            raise FieldError(f"prompt[{i}]", "must be a string or a list of token ids")
    return tokens, texts


def _check_completion_logprobs(data: CompletionRequest) -> None:
    """Alternatives (logprobs = k > 0) are known for prompt tokens (echo), and for generated ones only when the
    sampled token is the most likely (greedy, k = 1): what eval harnesses ask for their loglikelihoods."""
    k = data.logprobs or 0
    if k and data.max_tokens and not (k == 1 and data.temperature == 0):
        raise FieldError("logprobs", "alternatives of generated tokens are given only for greedy sampling "
                                     "(temperature 0) with logprobs=1; for the prompt (echo) any k up to 5 works "
                                     "with max_tokens=0")


async def _respond(gw: Gateway, tenant: str, gen: g.Generation, shape_type: type[Shape], data: Sampling,
                   logprobs: bool) -> Response | Stream:
    if data.stream:
        if len(gen.prompts) != 1:
            raise FieldError("prompt", "stream: true takes one prompt")
        fut = (await g.publish(gw, tenant, gen, stream=True))[0]
        deltas = gw.deltas.subscribe(fut.request_id)  # no await since publishing: no delta was missed
        shape = shape_type(gen, fut.request_id, logprobs)
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return Stream(sse.stream(gw, shape, fut, deltas, include_usage), media_type="text/event-stream",
                      headers={"cache-control": "no-cache"})
    futures = await g.publish(gw, tenant, gen)
    for fut in futures:
        await g.wait(gw, fut)
    shape = shape_type(gen, futures[0].request_id, logprobs)
    return Response(shape.response(g.choices(gen, futures)))


async def _target(gw: Gateway, tenant: str, data: Sampling) -> tuple[SamplingSession, Any, int | None]:
    """The parts of a Generation both endpoints share: the model's session and tokenizer, and its context."""
    g.refuse_unsupported(data)
    session = await g.sampling_session(gw, tenant, data.model)
    tokenizer = await gw.base_models.tokenizer(session.base_model)
    context = (await gw.base_models.info(session.base_model)).max_positions
    return session, tokenizer, context


@post("/v1/chat/completions", status_code=200, tags=["openai"], summary="OpenAI chat completions (stream too)")
async def chat_completions(data: JSONBody[ChatCompletionRequest], gw: GatewayDep,
                           tenant: TenantDep) -> Response | Stream:
    _refuse_chat_extras(data)
    session, tokenizer, context = await _target(gw, tenant, data)
    messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(data.messages)]
    prompt = await asyncio.to_thread(prompt_for_messages, tokenizer, messages, "messages")
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    if max_tokens is None:
        room = (context or g.ASSUMED_CONTEXT) - int(prompt.size)
        max_tokens = max(1, min(g.CHAT_DEFAULT_MAX_TOKENS, room))
    stops = g.stops_of(data)
    gen = g.Generation(data.model, session, tokenizer, [prompt], g.sampling_params(data, max_tokens, stops, tokenizer),
                       data.n, stops, "messages")
    return await _respond(gw, tenant, gen, ChatShape, data, data.logprobs)


@post("/v1/completions", status_code=200, tags=["openai"], summary="OpenAI (legacy) completions (stream too)")
async def completions(data: JSONBody[CompletionRequest], gw: GatewayDep, tenant: TenantDep) -> Response | Stream:
    if data.echo and data.stream:
        raise FieldError("echo", "not streamed: use stream=false to echo the prompt")
    if data.suffix:
        raise FieldError("suffix", "not supported (no fill-in-the-middle)")
    _check_completion_logprobs(data)
    session, tokenizer, _ = await _target(gw, tenant, data)
    prompts, texts = await _completion_prompts(tokenizer, data.prompt)
    stops = g.stops_of(data)
    gen = g.Generation(data.model, session, tokenizer, prompts,
                       g.sampling_params(data, data.max_tokens, stops, tokenizer), data.n, stops, "prompt",
                       echo=texts if data.echo else None, prompt_logprobs=data.echo and data.logprobs is not None,
                       top_logprobs=data.logprobs or 0)
    return await _respond(gw, tenant, gen, CompletionShape, data, data.logprobs is not None)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


@get("/v1/models", tags=["openai"], summary="The served base models")
async def list_models(gw: GatewayDep) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(name) for name in gw.settings.base_models]}


@get("/v1/models/{model:path}", tags=["openai"], summary="One served base model")
async def get_model(model: Annotated[str, PathParameter()], gw: GatewayDep) -> dict[str, Any]:
    # A path parameter keeps its leading slash; a served name may be an absolute path itself.
    name = model if gw.base_models.is_served(model) else model.removeprefix("/")
    if not gw.base_models.is_served(name):
        raise FieldError("model", f"{name!r} is not served here", 404)
    return _model_card(name)


ROUTES = [chat_completions, completions, list_models, get_model]
