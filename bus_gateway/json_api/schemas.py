"""Typed JSON bodies of the original server's JSON API (POST /fwdbwd, /add_lora, /sample, ...).

`model_id` in these bodies is the user's adapter name ("my-model", created on first use by /fwdbwd) or an
ordinary model id (`<session>:train:<n>`); names are checked against their rule where they are resolved, so
that a bad one gets a 400 that states the rule."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from bus_gateway.tinker_api.schemas import AdamParamsIn, Body, Id, ModelInput, ModelRef, SamplingParamsIn

# The original server's LoRA rank for adapters it creates (its alpha, 32, is our trainer's fixed LORA_ALPHA).
DEFAULT_RANK = 16


class ChatMessage(Body):
    role: Annotated[str, msgspec.Meta(min_length=1)]
    content: str


Conversation = Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]


class JsonForwardBackward(Body):
    """`data`: chat conversations. `loss_fn_inputs[name]`: one entry per conversation, either a list of
    per-token values or one number spread over its assistant tokens (e.g. a per-conversation advantage). A list
    lines up with the end of the conversation's model_input (its tokens minus the last): it has one value per
    model_input token, or fewer that still reach back to the first assistant token."""

    model_id: ModelRef
    data: Annotated[list[Conversation], msgspec.Meta(min_length=1)]
    loss_fn: str = "cross_entropy"
    loss_fn_inputs: dict[str, list[list[float] | float]] | None = None
    loss_fn_config: dict[str, float] | None = None
    forward_only: bool = False
    seq_id: Annotated[int, msgspec.Meta(ge=0)] | None = None


class JsonOptimStep(Body):
    model_id: ModelRef
    adam_params: AdamParamsIn | None = None
    learning_rate: float | None = None  # shorthand for adam_params.learning_rate
    seq_id: Annotated[int, msgspec.Meta(ge=0)] | None = None


class JsonPromise(msgspec.Struct, omit_defaults=True):
    request_id: str
    model_id: str | None = None
    status: str = "pending"


class JsonRetrieve(Body):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    timeout: Annotated[float, msgspec.Meta(ge=0, le=25)] = 25.0


class JsonResult(msgspec.Struct, omit_defaults=True):
    status: Literal["pending", "complete", "failed"]
    request_id: str
    request_type: str | None = None
    result: dict[str, Any] | None = None
    loss: float | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    category: str | None = None


class LossFunctionOut(msgspec.Struct):
    name: str
    description: str
    required_inputs: list[str]
    optional_inputs: dict[str, float]
    config_defaults: dict[str, float]


class LossFunctions(msgspec.Struct):
    available_loss_functions: list[str]
    descriptions: dict[str, str]
    loss_functions: list[LossFunctionOut]  # ours: inputs and config of each


class AddLoraRequest(Body):
    model_id: ModelRef | None = None  # the adapter name; the server picks one when it is missing
    base_model: str | None = None
    rank: Annotated[int, msgspec.Meta(ge=1, le=1024)] = DEFAULT_RANK
    alpha: float | None = None  # accepted for compatibility; the trainer fixes LoRA alpha
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    user_metadata: dict[str, Any] | None = None


class RemoveLoraRequest(Body):
    model_id: ModelRef


class AdapterOut(msgspec.Struct, omit_defaults=True):
    model_id: str  # the adapter name, or the model id of a model made without one (e.g. by the Tinker SDK)
    base_model: str
    lora_rank: int
    created_at: float
    training_run_id: str  # the model id the Tinker API, checkpoints and the event log know it by
    session_id: str | None = None


class Adapters(msgspec.Struct):
    adapters: list[AdapterOut]


class JsonSample(Body):
    """Synchronous sampling. Prompt: text, token ids, a ModelInput, or chat `messages`. Target: a training
    `model_id` (its current weights), a `sampling_session_id`, a `model_path`, or a `base_model`."""

    prompt: str | list[int] | ModelInput | None = None
    messages: list[ChatMessage] | None = None
    model_id: ModelRef | None = None
    sampling_session_id: Id | None = None
    model_path: str | None = None
    base_model: str | None = None
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=65536)] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str | int] | None = None
    seed: int | None = None
    sampling_params: SamplingParamsIn | None = None
    prompt_logprobs: bool = False


class SampledText(msgspec.Struct):
    text: str
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


class JsonSampleResult(msgspec.Struct, omit_defaults=True):
    request_id: str
    status: Literal["complete", "pending", "failed"]  # always sent: no default to omit
    error: str | None = None
    category: str | None = None
    text: str | None = None
    sequences: list[SampledText] | None = None
    prompt_tokens: int | None = None
    prompt_logprobs: list[float | None] | None = None
