"""Payload schemas, one per event type, and the result schemas that come back on the reply topic.

Every field here is part of the public, versioned contract documented in docs/events.md.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import numpy as np

from bus_events.tensors import Tensor

LossConfigValue = float | str


class _Payload(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


# ----------------------------------------------------------------------------- training requests


class LoraSpec(_Payload):
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024:
            raise msgspec.ValidationError(f"rank must be in [1, 1024], got {self.rank}")
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise msgspec.ValidationError("at least one of train_attn, train_mlp, train_unembed must be true")


class OptimizerSpec(_Payload):
    """The optimizer family of a model, fixed at its creation: AdamW, or Dimuon (SDK 0.38 DimuonOptimizerConfig,
    version 1). Each optim_step then sends that family's parameters."""

    type: Literal["adamw", "dimuon"] = "adamw"


class CreateModel(_Payload):
    base_model: str
    lora: LoraSpec = msgspec.field(default_factory=LoraSpec)
    optimizer: OptimizerSpec = msgspec.field(default_factory=OptimizerSpec)
    session_id: str | None = None
    user_metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class LoadWeights(_Payload):
    """Create a model from a training-state checkpoint (seq 0), or load into a fresh one (seq 1)."""

    path: str
    optimizer: bool = False
    base_model: str | None = None
    session_id: str | None = None
    user_metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # The new model's optimizer family when the load does not take the checkpoint's optimizer state (None: AdamW);
    # with optimizer=true the model keeps the checkpoint's family.
    optimizer_config: OptimizerSpec | None = None


class Datum(_Payload):
    """One sequence: `tokens` (int32 [N]) predicts `loss_fn_inputs["target_tokens"]` position by position."""

    tokens: Tensor
    loss_fn_inputs: dict[str, Tensor] = msgspec.field(default_factory=dict)


class ForwardBackward(_Payload):
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, LossConfigValue] = msgspec.field(default_factory=dict)
    forward_only: bool = False


class AdamParams(_Payload):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if value != value or value in (float("inf"), float("-inf")):
                raise msgspec.ValidationError(f"adam_params.{name} must be finite, got {value}")
            if value < 0:
                raise msgspec.ValidationError(f"adam_params.{name} must be >= 0, got {value}")
        if not (self.beta1 < 1 and self.beta2 < 1):
            raise msgspec.ValidationError("adam_params.beta1 and beta2 must be < 1")


class DimuonParams(_Payload):
    """One Dimuon step (SDK 0.38 DimuonParams). grad_clip_norm ≤ 0 disables clipping."""

    learning_rate: float
    grad_clip_norm: float = 0.0
    beta1: float = 0.9

    def __post_init__(self) -> None:
        for name in ("learning_rate", "grad_clip_norm", "beta1"):
            value = getattr(self, name)
            if value != value or value in (float("inf"), float("-inf")):
                raise msgspec.ValidationError(f"dimuon_params.{name} must be finite, got {value}")
        if self.learning_rate < 0:
            raise msgspec.ValidationError(f"dimuon_params.learning_rate must be >= 0, got {self.learning_rate}")
        if not 0 <= self.beta1 < 1:
            raise msgspec.ValidationError(f"dimuon_params.beta1 must be in [0, 1), got {self.beta1}")


class OptimStep(_Payload):
    """One optimizer step: `dimuon_params` for a model created with the Dimuon optimizer, else `adam_params`."""

    adam_params: AdamParams = msgspec.field(default_factory=AdamParams)
    dimuon_params: DimuonParams | None = None


class SaveWeights(_Payload):
    """Full training state (adapter + optimizer) under tinker://<model_id>/weights/<name>."""

    name: str
    ttl_seconds: int | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] = msgspec.field(default_factory=dict)


class SaveWeightsForSampler(_Payload):
    """Sampler weights: named (tinker://<model_id>/sampler_weights/<name>) or ephemeral (no name). An ephemeral
    `inflight` save overwrites the model's one shared INFLIGHT_NAME target, which every inflight session samples."""

    name: str | None = None
    sampling_session_id: str | None = None
    ttl_seconds: int | None = None
    user_metadata: dict[str, str] = msgspec.field(default_factory=dict)
    kind: Literal["snapshot", "inflight"] = "snapshot"

    def __post_init__(self) -> None:
        if self.kind == "inflight" and (self.name is not None or self.sampling_session_id is None):
            raise msgspec.ValidationError("kind 'inflight' needs a sampling_session_id and no name: inflight "
                                          "weights are the model's one shared target")


INFLIGHT_NAME = "inflight"  # tinker://<model_id>/sampler_weights/inflight: the mutable target of inflight saves


class SaveWeightsExternal(_Payload):
    """The adapter in PEFT format under tinker://<model_id>/external_weights/<name>, for use outside tinker
    (`tinker checkpoint download`, external_weights_urls)."""

    name: str
    ttl_seconds: int | None = None


class ExportModel(_Payload):
    """Merge a checkpoint's LoRA (tinker://<model_id>/{weights,sampler_weights}/<name>) into its base model and
    store the full model under runs/<model_id>/exports/<kind>-<name>/. No seq_id: it reads S3, not the live adapter."""

    path: str
    dtype: str | None = None  # bfloat16, float16 or float32; default: the base model's
    url_ttl_seconds: int = 86400  # lifetime of the presigned download URLs in the result


class GetInfo(_Payload):
    pass


class UnloadModel(_Payload):
    pass


class SeqVoid(_Payload):
    """A seq_id the gateway rejected: consumed, so the trainer must not wait for it."""

    reason: str = ""
    # The rejected request's event type, "" if unknown. A void forward_backward, or one of unknown type, fails
    # the current gradient window exactly like a failed forward_backward (its optim_step is not applied).
    request_type: str = ""


# ----------------------------------------------------------------------------- sampling requests


class SamplingParams(_Payload):
    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    # None: stop at EOS. []: never stop early. Strings and token ids may be mixed.
    stop: list[str | int] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_tokens <= 65536:
            raise msgspec.ValidationError(f"max_tokens must be in [0, 65536], got {self.max_tokens}")
        if not (self.temperature >= 0):
            raise msgspec.ValidationError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise msgspec.ValidationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise msgspec.ValidationError(f"top_k must be -1 (no limit) or at least 1, got {self.top_k}")


# The most cells [P - 1, K] that target_prompt_logprobs or prompt_alt_tokens may ask for (each answers that many
# int/float pairs): the bound the SDK says the server puts on len(prompt) * K.
MAX_PROMPT_OUTPUT_CELLS = 1 << 22


def prompt_output_problem(prompt_tokens: int, target_ids: np.ndarray | None, alt_tokens_k: int,
                          vocab_size: int | None = None) -> str | None:
    """Why a request's outputs at every prompt position cannot be served (the message starts with the field's
    name), or None. `target_ids` is target_prompt_logprobs as an integer array; `vocab_size` where known."""
    rows = prompt_tokens - 1
    if alt_tokens_k < 0:
        return f"prompt_alt_tokens_k must be >= 0, got {alt_tokens_k}"
    if alt_tokens_k and rows * alt_tokens_k > MAX_PROMPT_OUTPUT_CELLS:
        return f"prompt_alt_tokens_k {alt_tokens_k} x {rows} prompt positions exceeds {MAX_PROMPT_OUTPUT_CELLS} draws"
    if target_ids is None:
        return None
    shape = list(target_ids.shape)
    if len(shape) != 2 or shape[0] != rows or shape[1] < 1:
        return f"target_prompt_logprobs must be [len(prompt) - 1, K] = [{rows}, K >= 1], got {shape}"
    if target_ids.size > MAX_PROMPT_OUTPUT_CELLS:
        return f"target_prompt_logprobs {shape} exceeds {MAX_PROMPT_OUTPUT_CELLS} cells"
    if not (target_ids >= 0).any():
        return "target_prompt_logprobs names no token id (every cell is -1)"
    high = vocab_size if vocab_size is not None else np.iinfo(np.int64).max
    bad = target_ids[(target_ids < -1) | (target_ids >= high)]
    if bad.size:
        return f"target_prompt_logprobs ids must be -1 (none) or in [0, {high}), got {bad[:5].tolist()}"
    return None


class Sample(_Payload):
    sampling_session_id: str
    prompt: Tensor
    num_samples: int = 1
    sampling_params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: Tensor | None = None  # integer [P - 1, K]; -1 cells ask for nothing
    prompt_alt_tokens_k: int = 0
    # Also publish SampleDelta events (the tokens so far) on the reply topic while sampling, before the result.
    stream: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.num_samples <= 1024:
            raise msgspec.ValidationError(f"num_samples must be in [1, 1024], got {self.num_samples}")
        if self.topk_sample_logprobs < 0:
            raise msgspec.ValidationError(f"topk_sample_logprobs must be >= 0, got {self.topk_sample_logprobs}")
        target = self.target_prompt_logprobs
        if target is not None and target.dtype not in ("int32", "int64"):
            raise msgspec.ValidationError(f"target_prompt_logprobs must hold integer token ids, got {target.dtype}")
        problem = prompt_output_problem(self.prompt.numel, None if target is None else target.numpy(),
                                        self.prompt_alt_tokens_k)
        if problem is not None:
            raise msgspec.ValidationError(problem)


# ----------------------------------------------------------------------------- results


ErrorCategory = Literal["user", "server", "unknown"]
DeadLetterStage = Literal["decode", "validate", "apply"]


class ErrorInfo(_Payload):
    message: str
    category: ErrorCategory = "server"


class ModelInfo(_Payload):
    model_id: str
    base_model: str
    lora_rank: int
    train_attn: bool
    train_mlp: bool
    train_unembed: bool
    step: int = 0


class ForwardBackwardResult(_Payload):
    outputs: list[dict[str, Tensor]]
    metrics: dict[str, float]


class OptimStepResult(_Payload):
    metrics: dict[str, float]


class PathResult(_Payload):
    path: str | None = None
    sampling_session_id: str | None = None
    model_id: str | None = None
    size_bytes: int | None = None  # save_weights_external: the checkpoint's total size


class ExportResult(_Payload):
    path: str  # the exported checkpoint
    prefix: str  # the S3 prefix holding the merged model's files
    urls: dict[str, str]  # file name -> presigned GET URL
    size_bytes: int


# A padding cell of TopkLogprobs (tinker-protocol.md 3.2): rows with fewer than k entries, and rows the client did
# not ask for, are filled with this (token id, logprob) pair.
TOPK_PAD_ID = 0
TOPK_PAD_LOGPROB = -99999.0


class TopkLogprobs(_Payload):
    token_ids: Tensor  # int32 [P, k]
    logprobs: Tensor  # float32 [P, k]


class SampledSequence(_Payload):
    tokens: Tensor
    logprobs: Tensor
    stop_reason: Literal["stop", "length"]
    topk_logprobs: TopkLogprobs | None = None  # [T, k] when the request's topk_sample_logprobs = k > 0


class PromptAltTokens(_Payload):
    tokens: Tensor  # int32 [P - 1, k]: row i draws alternatives to prompt[i + 1]
    logprobs: Tensor  # float32 [P - 1, k]


class SampleResult(_Payload):
    sequences: list[SampledSequence]
    prompt_logprobs: Tensor | None = None  # float32 [P], NaN at position 0
    topk_prompt_logprobs: TopkLogprobs | None = None
    prompt_cache_hit_tokens: int = 0
    target_prompt_logprobs: Tensor | None = None  # float32 [P - 1, K], NaN where the request had -1
    prompt_alt_tokens: PromptAltTokens | None = None


class Cancel(_Payload):
    """Skip a queued request (`cancel_future`): it is answered with a "cancelled" error instead of being computed.
    Sent on the request's own topic with its key, so it reaches the worker holding the request, after it."""

    request_id: str  # the request to skip; it must be of the cancel event's tenant
    reason: str = ""


class SequenceDelta(_Payload):
    """New tokens of one sample of a streamed request: they replace whatever followed position `start`."""

    index: int  # the sample (0 .. num_samples-1)
    start: int  # position of tokens[0] in the sample's generated tokens
    tokens: list[int]
    logprobs: list[float]


class SampleDelta(_Payload):
    """Progress of a `sample` request with `stream: true`. Best effort: deltas may be missed, repeated or arrive
    after the result; the `result` event alone is the answer."""

    sequences: list[SequenceDelta]


class Result(_Payload):
    """The payload of every `result` event. Exactly one of `result` / `error` is set."""

    request_type: str
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    # When the worker started computing the request (Unix time): with the request's and the result's envelope
    # `created_at`, it splits the request's time into queue and compute (the session trace export).
    started_at: float | None = None


class DeadLetter(_Payload):
    reason: str
    stage: DeadLetterStage
    source_topic: str
    source_partition: int
    source_offset: int
    raw: bytes
