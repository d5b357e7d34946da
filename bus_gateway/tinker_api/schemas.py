"""Typed JSON bodies of the Tinker API (tinker-protocol.md §2-3). Unknown fields are ignored (the SDK adds
fields over time); a missing or mistyped known field is a 400 that names it. Responses omit None fields,
because the SDK's strict models reject null where a field is not Optional."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from bus_events import payloads as p

NonNegative = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Ids end up in S3 keys and tinker:// paths. Every id we issue fits this (sess-<hex>:train:<n>, ...).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$"
Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
# A model id, or a JSON-API adapter name (checked against its own rule where it is resolved).
ModelRef = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Body(msgspec.Struct, kw_only=True):
    pass


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    pass


# ------------------------------------------------------------------ bootstrap and sessions
class ClientConfigRequest(Body):
    sdk_version: str | None = None


class ClientConfigResponse(msgspec.Struct, kw_only=True):
    """Every flag is sent explicitly: the SDK's own defaults differ (e.g. use_pyqwest_transport=true)."""

    pjwt_auth_enabled: bool = False
    use_pyqwest_transport: bool = False
    parallel_fwdbwd_chunks: bool = True
    proto_compress_fwdbwd: bool = True
    sample_use_retrieve_futures: bool = False
    custom_loss_server_side: bool = True  # create_custom_loss: graphs run from a closed list of operations
    sample_join_sampling_session: bool = False


# A session's tags are stored with it and kept in the gateway's session cache: bounded (the SDK sends a few).
MAX_TAGS, MAX_TAG_CHARS = 64, 256
Tags = Annotated[list[Annotated[str, msgspec.Meta(max_length=MAX_TAG_CHARS)]], msgspec.Meta(max_length=MAX_TAGS)]


class CreateSessionRequest(Body):
    tags: Tags = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str | None = None
    project_id: str | None = None
    display_name: Annotated[str, msgspec.Meta(max_length=MAX_TAG_CHARS)] | None = None
    type: Literal["create_session"] = "create_session"


class CreateSessionResponse(Reply):
    session_id: str
    type: Literal["create_session"] = "create_session"
    info_message: str | None = None


class SessionHeartbeatRequest(Body):
    session_id: Id
    type: Literal["session_heartbeat"] = "session_heartbeat"


class SessionHeartbeatResponse(msgspec.Struct):
    type: Literal["session_heartbeat"] = "session_heartbeat"


class FinishReason(Body):
    type: Literal["success", "errored", "interrupted"] = "success"


class FinishSessionRequest(Body):
    reason: FinishReason | None = None
    detail: str | None = None


class StatusResponse(msgspec.Struct):
    status: str


class TelemetryRequest(Body):
    events: list[dict[str, Any]] = []
    platform: str | None = None
    sdk_version: str | None = None
    session_id: str | None = None
    process_uuid: str | None = None


class SupportedModel(Reply):
    model_name: str
    max_context_length: int | None = None
    trainable: bool = True
    sampleable: bool = True


class ServerCapabilities(msgspec.Struct):
    supported_models: list[SupportedModel]


# ------------------------------------------------------------------ futures
class UntypedFuture(Reply):
    request_id: str
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None


class RetrieveFutureRequest(Body):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    allow_metadata_only: bool = False


class TryAgain(msgspec.Struct):
    request_id: str
    queue_state: Literal["active", "paused_capacity", "paused_rate_limit"] = "active"
    queue_state_reason: str | msgspec.UnsetType = msgspec.UNSET  # why it waits (the SDK logs it); left out if unset
    type: Literal["try_again"] = "try_again"


class RequestFailed(msgspec.Struct):
    error: str
    category: Literal["user", "server", "unknown"]


# ------------------------------------------------------------------ training
class LoraConfig(Body):
    rank: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(Body):
    type: str = "adamw"
    version: int | None = None  # dimuon's (SDK 0.38 DimuonOptimizerConfig: 1)


class CreateModelRequest(Body):
    session_id: Id
    model_seq_id: NonNegative
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None
    user_metadata: dict[str, Any] | None = None
    type: Literal["create_model"] = "create_model"


class GetInfoRequest(Body):
    model_id: ModelRef
    type: Literal["get_info"] = "get_info"


class ModelData(Reply):
    model_name: str
    tokenizer_id: str
    arch: str | None = None


class OptimizerConfigOut(msgspec.Struct):
    type: str = "adamw"


class GetInfoResponse(Reply):
    model_id: str
    model_data: ModelData
    model_name: str
    is_lora: bool = True
    lora_rank: int | None = None
    optimizer_config: OptimizerConfigOut = msgspec.field(default_factory=OptimizerConfigOut)
    type: Literal["get_info"] = "get_info"


_WIRE_ADAM = p.AdamParams()  # the defaults live in the contract; the HTTP body takes them from there


class AdamParamsIn(Body):
    """The SDK's AdamParams as sent: any field may be missing (the contract's default then applies) and values are
    checked by the submission layer, so an error names the HTTP field (the wire struct validates on construction)."""

    learning_rate: float = _WIRE_ADAM.learning_rate
    beta1: float = _WIRE_ADAM.beta1
    beta2: float = _WIRE_ADAM.beta2
    eps: float = _WIRE_ADAM.eps
    weight_decay: float = _WIRE_ADAM.weight_decay
    grad_clip_norm: float = _WIRE_ADAM.grad_clip_norm
    type: str | None = None  # present in `optimizer_params` for non-Adam families


class OptimStepRequest(Body):
    model_id: ModelRef
    seq_id: NonNegative | None = None
    adam_params: AdamParamsIn | None = None
    optimizer_params: AdamParamsIn | None = None
    optim_params: AdamParamsIn | None = None
    type: Literal["optim_step"] = "optim_step"


class SaveWeightsRequest(Body):
    model_id: Id
    path: str | None = None
    seq_id: NonNegative | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights"] = "save_weights"


class SaveWeightsForSamplerRequest(Body):
    model_id: Id
    path: str | None = None
    sampling_session_seq_id: NonNegative | None = None
    kind: Literal["snapshot", "inflight"] = "snapshot"
    seq_id: NonNegative | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user_metadata: dict[str, str] | None = None
    type: Literal["save_weights_for_sampler"] = "save_weights_for_sampler"


class LoadWeightsRequest(Body):
    path: str
    optimizer: bool = False
    model_id: Id | None = None
    seq_id: NonNegative | None = None
    session_id: Id | None = None
    model_seq_id: NonNegative | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfig | None = None
    weights_access_token: str | None = None
    type: Literal["load_weights"] = "load_weights"


class UnloadModelRequest(Body):
    model_id: Id
    type: Literal["unload_model"] = "unload_model"


# ------------------------------------------------------------------ sampling
class EncodedTextChunk(Body, tag="encoded_text", tag_field="type"):
    tokens: list[int]


class ImageChunk(Body, tag="image", tag_field="type"):
    data: str
    format: str
    expected_tokens: int | None = None


class ImageAssetPointerChunk(Body, tag="image_asset_pointer", tag_field="type"):
    format: str
    location: str
    expected_tokens: int | None = None


class DmelChunk(Body, tag="dmel", tag_field="type"):
    dmel: str


ModelInputChunk = EncodedTextChunk | ImageChunk | ImageAssetPointerChunk | DmelChunk


class ModelInput(Body):
    chunks: list[ModelInputChunk]


class SamplingParamsIn(Body):
    max_tokens: NonNegative | None = None
    seed: int | None = None
    stop: str | list[str | int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


class CreateSamplingSessionRequest(Body):
    session_id: Id
    sampling_session_seq_id: NonNegative
    base_model: str | None = None
    model_path: str | None = None
    type: Literal["create_sampling_session"] = "create_sampling_session"


class CreateSamplingSessionResponse(msgspec.Struct):
    sampling_session_id: str
    type: Literal["create_sampling_session"] = "create_sampling_session"


class SamplerInfo(Reply):
    sampler_id: str
    base_model: str
    model_path: str | None = None


class TensorDataIn(Body):
    """The SDK's TensorData JSON (tinker-protocol.md 3.4): dense, or sparse CSR when the index lists are set."""

    data: list[int | float]
    dtype: str
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None


class SampleRequest(Body):
    prompt: ModelInput
    sampling_params: SamplingParamsIn
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    sampling_session_id: Id | None = None
    seq_id: NonNegative | None = None
    base_model: str | None = None
    model_path: str | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: NonNegative = 0
    topk_sample_logprobs: NonNegative = 0
    target_prompt_logprobs: dict[str, Any] | None = None
    prompt_alt_tokens_k: NonNegative = 0
    prompt_logprobs_last_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"


# ------------------------------------------------------------------ checkpoints and runs
class Cursor(msgspec.Struct):
    offset: int
    limit: int
    total_count: int


class CheckpointOut(Reply):
    checkpoint_id: str
    checkpoint_type: str
    time: str
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    user_metadata: dict[str, str] | None = None
    expires_at: str | None = None
    base_model: str | None = None  # SDK 0.39


class CheckpointsList(Reply):
    checkpoints: list[CheckpointOut]
    cursor: Cursor | None = None


class TrainingRunOut(Reply):
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: str
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: CheckpointOut | None = None
    last_sampler_checkpoint: CheckpointOut | None = None
    user_metadata: dict[str, str] | None = None


class TrainingRunsList(msgspec.Struct):
    training_runs: list[TrainingRunOut]
    cursor: Cursor


class WeightsInfoRequest(Body):
    tinker_path: str


class WeightsInfoResponse(Reply):
    base_model: str
    is_lora: bool  # required by the SDK, so never omitted as a default
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None
    optimizer_config: OptimizerConfigOut = msgspec.field(default_factory=OptimizerConfigOut)


class CheckpointTtlRequest(Body):
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None


class ExternalWeightsUrls(msgspec.Struct):
    urls: dict[str, str]
    expires: str
