"""Request bodies of the OpenAI-compatible API (the fields of OpenAI's chat and completions requests that a
sampler can honour). Unknown fields are ignored, as OpenAI's own clients send new ones over time; a field we
know but cannot honour is refused by name (openai_api.requests)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

# OpenAI allows up to 4 stop sequences and 128 choices.
MAX_STOPS, MAX_CHOICES = 4, 128

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)]
MaxTokens = Annotated[int, msgspec.Meta(ge=0)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOPS)] | None
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class Body(msgspec.Struct, kw_only=True):
    pass


class ContentPart(Body, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(Body, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Body, kw_only=True):
    include_usage: bool = False


class Sampling(Body, kw_only=True):
    """What both endpoints share."""

    model: ModelName
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices = 1
    stop: Stop = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# A string, strings, token ids or lists of token ids (routes._completion_prompts tells them apart).
Prompt = str | list[Any]


class CompletionRequest(Sampling, kw_only=True):
    prompt: Prompt
    max_tokens: MaxTokens = 16  # OpenAI's default for completions
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
