"""From an OpenAI request to sample events and back: which model (a served base model or an owned
`tinker://.../sampler_weights/...` checkpoint), the prompts, the sampling parameters, and the sampler's answer
as choices. Both endpoints (chat, completions) go through here; only their prompts and shapes differ."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from litestar.exceptions import HTTPException

from artifact_store import SamplingSession
from bus_events import payloads as p
from bus_gateway import submit
from bus_gateway.errors import FieldError
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.openai_api.schemas import Sampling
from bus_gateway.openai_api.text import visible_text
from bus_gateway.results import failure, sample_json, sample_result
from bus_gateway.sampling_sessions import adhoc_sampling_session
from bus_gateway.tinker_api.schemas import SamplingParamsIn

CHECKPOINT_SCHEME = "tinker://"
# Chat requests without max_tokens may use the rest of the context, up to this many tokens.
CHAT_DEFAULT_MAX_TOKENS = 4096
ASSUMED_CONTEXT = 2 * CHAT_DEFAULT_MAX_TOKENS  # for a model whose config names no context length


@dataclass
class Echo:
    """A completions choice's prompt, when `echo` asked for it: text, tokens, and their logprobs (None at 0)."""

    text: str
    tokens: list[int]
    logprobs: list[float | None] | None = None
    top: list[list[tuple[int, float]] | None] | None = None  # the k most likely tokens per position


@dataclass
class Choice:
    index: int
    tokens: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"
    echo: Echo | None = None


@dataclass
class Generation:
    """One OpenAI request, ready to publish: one sample event per prompt, `n` samples each."""

    model: str  # as the client named it (echoed in every response)
    session: SamplingSession
    tokenizer: Any
    prompts: list[np.ndarray]
    params: SamplingParamsIn
    n: int
    stops: list[str]
    prompt_field: str
    created: int = field(default_factory=lambda: int(time.time()))
    # completions: echo the prompts (texts as given; None: decode the prompt's token ids), with their logprobs and
    # top-k when logprobs asks for them
    echo: list[str | None] | None = None
    prompt_logprobs: bool = False
    top_logprobs: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(int(prompt.size) for prompt in self.prompts)


async def sampling_session(gw: Gateway, tenant: str, model: str) -> SamplingSession:
    """The session that samples `model`: a served base model, or a checkpoint path of the caller's."""
    if not model.startswith(CHECKPOINT_SCHEME):
        if not gw.base_models.is_served(model):
            raise FieldError("model", f"{model!r} is not served here (served: {', '.join(gw.settings.base_models)}; "
                                      "or name one of your tinker://.../sampler_weights/... checkpoints)", 404)
        return await adhoc_sampling_session(gw, tenant, model, None)
    try:
        return await adhoc_sampling_session(gw, tenant, None, model)
    except FieldError as exc:
        raise FieldError("model", exc.message, exc.status_code) from exc


def refuse_unsupported(data: Sampling) -> None:
    if data.presence_penalty or data.frequency_penalty:
        name = "presence_penalty" if data.presence_penalty else "frequency_penalty"
        raise FieldError(name, "penalties are not supported by this sampler (send 0 or leave it out)")
    if data.logit_bias:
        raise FieldError("logit_bias", "not supported by this sampler")
    if data.best_of is not None and data.best_of != data.n:
        raise FieldError("best_of", "not supported (every sample is returned: use n)")


def stops_of(data: Sampling) -> list[str]:
    stops = [data.stop] if isinstance(data.stop, str) else list(data.stop or [])
    for i, stop in enumerate(stops):
        if not stop:
            raise FieldError(f"stop[{i}]" if not isinstance(data.stop, str) else "stop", "must not be empty")
    return stops


def sampling_params(data: Sampling, max_tokens: int, stops: list[str], tokenizer: Any) -> SamplingParamsIn:
    """Stop strings replace the sampler's default stop (end of sequence), so the EOS token is added to them:
    OpenAI models always stop there."""
    stop: list[str | int] | None = None
    if stops:
        stop = [*stops, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])]
    return SamplingParamsIn(max_tokens=max_tokens, seed=data.seed, stop=stop,
                            temperature=1.0 if data.temperature is None else data.temperature,
                            top_p=1.0 if data.top_p is None else data.top_p)


async def publish(gw: Gateway, tenant: str, gen: Generation, stream: bool = False) -> list[Future]:
    return [await submit.sample(gw, tenant, gen.session, submit.SampleInput(
        prompt=prompt, num_samples=gen.n, params=gen.params, prompt_field=gen.prompt_field, stream=stream,
        prompt_logprobs=gen.prompt_logprobs, topk_prompt_logprobs=gen.top_logprobs if gen.prompt_logprobs else 0))
        for prompt in gen.prompts]


def raise_failure(fut: Future) -> None:
    failed = failure(fut)
    if failed is not None:
        status = 400 if failed["category"] == "user" else 500
        raise HTTPException(status_code=status, detail=f"sampling failed: {failed['error']}")


async def wait(gw: Gateway, fut: Future) -> None:
    timeout = gw.config.sync_sample_timeout_s
    if not await fut.wait(timeout):
        raise HTTPException(status_code=504, detail=f"the sampler did not answer within {timeout:g} s; retry later")
    raise_failure(fut)


def finish_reason(sequence: p.SampledSequence, stopped_by_string: bool) -> str:
    return "stop" if stopped_by_string or sequence.stop_reason == "stop" else "length"


def choices(gen: Generation, futures: list[Future]) -> list[Choice]:
    """The answered futures' samples, prompt by prompt (choice index = prompt * n + sample)."""
    found: list[Choice] = []
    for i, fut in enumerate(futures):
        result = sample_result(fut)
        echo = None
        if gen.echo is not None:
            prompt = sample_json(result, [])  # the prompt logprobs only, in the Tinker API's JSON
            tokens = gen.prompts[i].tolist()
            given = gen.echo[i]
            text = given if given is not None else str(gen.tokenizer.decode(tokens))
            echo = Echo(text, tokens, prompt.get("prompt_logprobs"), prompt.get("topk_prompt_logprobs"))
        for sequence in result.sequences:
            tokens = sequence.tokens.numpy().tolist()
            text, stopped = visible_text(gen.tokenizer, tokens, gen.stops)
            found.append(Choice(len(found), tokens, sequence.logprobs.numpy().tolist(), text,
                                finish_reason(sequence, stopped), echo))
    return found


def usage(gen: Generation, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": gen.prompt_tokens + completion_tokens}
