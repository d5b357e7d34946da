"""Training endpoints (tinker-protocol.md 2.2): every POST validates, publishes one event on the train topic
keyed by model_id, and answers a promise at once; the trainer applies a model's events in seq_id order."""

from __future__ import annotations

import asyncio

from litestar import Request, post
from litestar.params import JSONBody

from bus_events import payloads as p
from bus_events.ids import is_model_id, model_id_for, sampling_session_id_for, session_of_model
from bus_gateway import submit
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.proto_codec import declared_size, read_forward_backward
from bus_gateway.tinker_api.checkpoints import readable_checkpoint
from bus_gateway.tinker_api.custom_losses import with_custom_loss
from bus_gateway.tinker_api.futures_api import promise
from bus_gateway.tinker_api.schemas import (
    CreateModelRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoraConfig,
    ModelData,
    OptimizerConfig,
    OptimizerConfigOut,
    OptimStepRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    UntypedFuture,
)
from bus_gateway.validation import build, checkpoint_name, parse_path

# forward_backward bodies up to this size (decompressed) are read on the event loop: ~0.5 ms for the 263 KB of an
# 8 x 2048-token step (decompress, parse, tensors), less than the 0.5-0.9 ms that the thread hop it replaces added
# on a busy 2-core host (issue 14). A step's body is ~16 bytes a token, so this covers ~32k tokens.
INLINE_BODY_BYTES = 512 << 10


def _optimizer(config: OptimizerConfig | None, field: str = "optimizer_config") -> p.OptimizerSpec:
    """The model's optimizer family: AdamW (the default) or Dimuon version 1 (SDK 0.38)."""
    if config is None:
        return p.OptimizerSpec()
    if config.type not in ("adamw", "dimuon"):
        raise FieldError(f"{field}.type", f"optimizer {config.type!r} is not served (served: adamw, dimuon)")
    if config.type == "dimuon" and config.version not in (None, 1):
        raise FieldError(f"{field}.version", f"dimuon version {config.version!r} is not served (served: 1)")
    return p.OptimizerSpec(type=config.type)  # type: ignore[arg-type]  # checked just above


def _create_model(data: CreateModelRequest) -> p.CreateModel:
    optimizer = _optimizer(data.optimizer_config)
    lora = data.lora_config or LoraConfig()
    spec = build(p.LoraSpec, "lora_config", **{name: getattr(lora, name) for name in p.LoraSpec.__struct_fields__})
    return p.CreateModel(base_model=data.base_model, lora=spec, optimizer=optimizer, session_id=data.session_id,
                         user_metadata=dict(data.user_metadata or {}))


@post("/api/v1/create_model", status_code=200, tags=["training"])
async def create_model(data: JSONBody[CreateModelRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.session(data.session_id, tenant)
    model_id = model_id_for(data.session_id, data.model_seq_id)
    return promise(await submit.create_model(gw, tenant, model_id, lambda: _create_model(data)))


@post(["/api/v1/get_info", "/get_info"], status_code=200, tags=["training"],
      summary="A model's facts; model_id may also be a JSON-API adapter name")
async def get_info(data: JSONBody[GetInfoRequest], gw: GatewayDep, tenant: TenantDep) -> GetInfoResponse:
    model_id = data.model_id if is_model_id(data.model_id) else (await gw.live_model(data.model_id, tenant))[0]
    run = await gw.run(model_id, tenant)
    try:
        arch = (await gw.base_models.info(run.base_model)).model_type
    except Exception:  # informational only
        arch = None
    return GetInfoResponse(
        model_id=data.model_id, model_name=run.base_model, lora_rank=run.lora_rank,
        model_data=ModelData(model_name=run.base_model, tokenizer_id=run.base_model, arch=arch),
        optimizer_config=OptimizerConfigOut(type=run.optimizer),
    )


async def proto_forward_backward(request: Request, gw: Gateway, tenant: str) -> UntypedFuture:
    """The SDK's forward_backward / forward: a protobuf ForwardBackwardRequest, optionally zstd-compressed."""
    body = await request.body()
    zstd = "zstd" in request.headers.get("content-encoding", "").lower()
    limit, size = gw.config.max_body_bytes, declared_size(body, zstd)
    if size is not None and size <= INLINE_BODY_BYTES:
        # A frame that lies about its size is cut at the inline cap (413), so the loop never decompresses more.
        model_id, seq_id, build = read_forward_backward(body, min(limit, INLINE_BODY_BYTES) if zstd else None)
    else:  # bigger bodies, up to max_body_bytes: off the event loop, so /healthz and other requests never wait
        model_id, seq_id, build = await asyncio.to_thread(read_forward_backward, body, limit if zstd else None)
    run = await gw.live_run(model_id, tenant)
    session_id = run.session_id or session_of_model(model_id)

    async def payload() -> p.ForwardBackward:
        return await with_custom_loss(gw, tenant, session_id, build())

    return promise(await submit.forward_backward(gw, tenant, model_id, seq_id, run.base_model, payload))


@post("/api/v1/optim_step", status_code=200, tags=["training"],
      summary="model_id may also be a JSON-API adapter name")
async def optim_step(data: JSONBody[OptimStepRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    field, params = next(((name, value) for name, value in (
        ("adam_params", data.adam_params), ("optimizer_params", data.optimizer_params),
        ("optim_params", data.optim_params)) if value is not None), ("adam_params", None))
    model_id, _ = await gw.live_model(data.model_id, tenant)
    fut = await submit.optim_step(gw, tenant, model_id, data.seq_id, lambda: submit.optim_step_payload(params, field))
    return promise(fut, model_id=data.model_id)


@post("/api/v1/save_weights", status_code=200, tags=["training"])
async def save_weights(data: JSONBody[SaveWeightsRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.live_run(data.model_id, tenant)
    return promise(await submit.save_weights(gw, tenant, data.model_id, data.seq_id, lambda: p.SaveWeights(
        name=checkpoint_name(data.path), ttl_seconds=data.ttl_seconds, overwrite=data.overwrite,
        user_metadata=dict(data.user_metadata or {}))))


def _save_for_sampler(data: SaveWeightsForSamplerRequest, session_id: str) -> p.SaveWeightsForSampler:
    metadata = dict(data.user_metadata or {})
    if data.path is not None:
        if data.kind == "inflight":
            raise FieldError("kind", "inflight weights are the model's one shared target: send no path")
        return p.SaveWeightsForSampler(name=checkpoint_name(data.path), ttl_seconds=data.ttl_seconds,
                                       user_metadata=metadata)
    if data.sampling_session_seq_id is not None:
        return p.SaveWeightsForSampler(
            sampling_session_id=sampling_session_id_for(session_id, data.sampling_session_seq_id),
            ttl_seconds=data.ttl_seconds, user_metadata=metadata, kind=data.kind)
    raise FieldError("path", "give a checkpoint name (path) or sampling_session_seq_id for an ephemeral save")


@post("/api/v1/save_weights_for_sampler", status_code=200, tags=["training"])
async def save_weights_for_sampler(data: JSONBody[SaveWeightsForSamplerRequest], gw: GatewayDep,
                                   tenant: TenantDep) -> UntypedFuture:
    run = await gw.live_run(data.model_id, tenant)
    session_id = run.session_id or session_of_model(data.model_id)
    return promise(await submit.save_weights_for_sampler(gw, tenant, data.model_id, data.seq_id,
                                                         lambda: _save_for_sampler(data, session_id)))


async def _load_weights(gw: Gateway, tenant: str, data: LoadWeightsRequest) -> p.LoadWeights:
    path = parse_path(data.path)
    if path.kind != "weights":
        raise FieldError("path", "load_weights needs a training-state path tinker://<run>/weights/<name>")
    try:
        info, _ = await readable_checkpoint(gw, tenant, path)  # the caller's, or a published one
    except NotFound as exc:
        raise FieldError("path", f"no checkpoint {path} (or it is not yours)", status_code=404) from exc
    if data.base_model is not None and data.base_model != info.base_model:
        raise FieldError("base_model", f"checkpoint {path} was trained on {info.base_model!r}, "
                                       f"not {data.base_model!r}")
    optimizer = _optimizer(data.optimizer_config) if data.optimizer_config is not None else None
    return p.LoadWeights(path=str(path), optimizer=data.optimizer, base_model=data.base_model or info.base_model,
                         session_id=data.session_id, user_metadata=dict(data.user_metadata or {}),
                         optimizer_config=optimizer)


@post("/api/v1/load_weights", status_code=200, tags=["training"],
      summary="Create a model from a training-state checkpoint (session_id + model_seq_id), or load into one")
async def load_weights(data: JSONBody[LoadWeightsRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    seq_id: int | None
    if data.session_id is not None and data.model_seq_id is not None:
        await gw.session(data.session_id, tenant)
        model_id, seq_id = model_id_for(data.session_id, data.model_seq_id), 0
    elif data.model_id is not None:
        await gw.live_run(data.model_id, tenant)
        model_id, seq_id = data.model_id, data.seq_id
    else:
        raise FieldError("model_id", "give session_id + model_seq_id (new model) or model_id + seq_id")
    return promise(await submit.load_weights(gw, tenant, model_id, seq_id, lambda: _load_weights(gw, tenant, data)))


@post("/api/v1/unload_model", status_code=200, tags=["training"])
async def unload_model(data: JSONBody[UnloadModelRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.live_run(data.model_id, tenant)
    return promise(await submit.unload(gw, tenant, data.model_id))


ROUTES = [create_model, get_info, optim_step, save_weights, save_weights_for_sampler,
          load_weights, unload_model]
