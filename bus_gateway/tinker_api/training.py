"""Training endpoints (tinker-protocol.md 2.2): every POST validates, publishes one event on the train topic
keyed by model_id, and answers a promise at once; the trainer applies a model's events in seq_id order."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, post
from litestar.params import JSONBody

from artifact_store import CheckpointNotFound
from bus_events import EventType
from bus_events import payloads as p
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.futures import Future
from bus_gateway.proto_codec import decode_forward_backward, decompress_zstd
from bus_gateway.state import Gateway
from bus_gateway.tinker_api.common import (
    build,
    checkpoint_name,
    model_id_for,
    parse_path,
    promise,
    sampling_session_id_for,
    session_of_model,
    submit_training,
)
from bus_gateway.tinker_api.schemas import (
    AdamParamsIn,
    CreateModelRequest,
    GetInfoRequest,
    GetInfoResponse,
    LoadWeightsRequest,
    LoraConfig,
    ModelData,
    OptimizerConfig,
    OptimStepRequest,
    SaveWeightsForSamplerRequest,
    SaveWeightsRequest,
    UnloadModelRequest,
    UntypedFuture,
)
from bus_gateway.validation import validate_forward_backward

ADAM_TYPES = (None, "adam", "adamw")


def _check_optimizer(config: OptimizerConfig | None, field: str = "optimizer_config") -> None:
    if config is not None and config.type != "adamw":
        raise FieldError(f"{field}.type", f"only 'adamw' is supported, got {config.type!r}")


def _check_served(gw: Gateway, base_model: str, field: str = "base_model") -> None:
    if not gw.base_models.is_served(base_model):
        served = ", ".join(gw.settings.base_models)
        raise FieldError(field, f"{base_model!r} is not served here (served: {served})")


@post("/api/v1/create_model", status_code=200, tags=["training"])
async def create_model(data: JSONBody[CreateModelRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.session(data.session_id, tenant)
    model_id = model_id_for(data.session_id, data.model_seq_id)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        _check_served(gw, data.base_model)
        _check_optimizer(data.optimizer_config)
        lora = data.lora_config or LoraConfig()
        spec = build(p.LoraSpec, "lora_config", rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn,
                     train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)
        return EventType.CREATE_MODEL, p.CreateModel(base_model=data.base_model, lora=spec,
                                                     session_id=data.session_id,
                                                     user_metadata=dict(data.user_metadata or {}))

    return promise(await submit_training(gw, tenant, model_id, 0, checked))


@post(["/api/v1/get_info", "/get_info"], status_code=200, tags=["training"])
async def get_info(data: JSONBody[GetInfoRequest], gw: GatewayDep, tenant: TenantDep) -> GetInfoResponse:
    run = await gw.run(data.model_id, tenant)
    try:
        arch = (await gw.base_models.info(run.base_model)).model_type
    except Exception:  # informational only
        arch = None
    return GetInfoResponse(
        model_id=run.model_id, model_name=run.base_model, lora_rank=run.lora_rank,
        model_data=ModelData(model_name=run.base_model, tokenizer_id=run.base_model, arch=arch),
    )


async def submit_forward_backward(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                                  payload: p.ForwardBackward, context: dict[str, Any] | None = None) -> Future:
    run = await gw.live_run(model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        validate_forward_backward(payload, (await gw.base_models.info(run.base_model)).vocab_size)
        return EventType.FORWARD_BACKWARD, payload

    return await submit_training(gw, tenant, model_id, seq_id, checked, context,
                                 request_type=EventType.FORWARD_BACKWARD)


@post("/api/v1/forward_backward", status_code=200, tags=["training"],
      summary="forward_backward / forward: protobuf ForwardBackwardRequest (optionally zstd), or legacy JSON",
      description="Content-Type application/x-protobuf: the SDK's body (tinker-protocol.md 3.2). "
                  "Content-Type application/json: the original server's JSON (see POST /fwdbwd).")
async def forward_backward(request: Request, gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    if "json" in request.headers.get("content-type", ""):
        from bus_gateway.legacy_api import json_forward_backward  # the JSON dialect lives with the legacy API

        return await json_forward_backward(request, gw, tenant)
    body = await request.body()
    if "zstd" in request.headers.get("content-encoding", "").lower():
        body = decompress_zstd(body, gw.config.max_body_bytes)
    model_id, seq_id, payload = decode_forward_backward(body)
    return promise(await submit_forward_backward(gw, tenant, model_id, seq_id, payload))


def adam_params(params: AdamParamsIn | None, field: str = "adam_params") -> p.AdamParams:
    params = params or AdamParamsIn()
    if params.type not in ADAM_TYPES:
        raise FieldError(f"{field}.type", f"only AdamW is supported, got optimizer {params.type!r}")
    return build(p.AdamParams, field, learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                 eps=params.eps, weight_decay=params.weight_decay, grad_clip_norm=params.grad_clip_norm)


async def submit_optim_step(gw: Gateway, tenant: str, model_id: str, seq_id: int | None,
                            params: AdamParamsIn | None, field: str) -> Future:
    await gw.live_run(model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        return EventType.OPTIM_STEP, p.OptimStep(adam_params=adam_params(params, field))

    return await submit_training(gw, tenant, model_id, seq_id, checked, request_type=EventType.OPTIM_STEP)


@post("/api/v1/optim_step", status_code=200, tags=["training"])
async def optim_step(data: JSONBody[OptimStepRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    field, params = next(((name, value) for name, value in (
        ("adam_params", data.adam_params), ("optimizer_params", data.optimizer_params),
        ("optim_params", data.optim_params)) if value is not None), ("adam_params", None))
    return promise(await submit_optim_step(gw, tenant, data.model_id, data.seq_id, params, field))


@post("/api/v1/save_weights", status_code=200, tags=["training"])
async def save_weights(data: JSONBody[SaveWeightsRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.live_run(data.model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        return EventType.SAVE_WEIGHTS, p.SaveWeights(
            name=checkpoint_name(data.path), ttl_seconds=data.ttl_seconds, overwrite=data.overwrite,
            user_metadata=dict(data.user_metadata or {}))

    return promise(await submit_training(gw, tenant, data.model_id, data.seq_id, checked,
                                         request_type=EventType.SAVE_WEIGHTS))


@post("/api/v1/save_weights_for_sampler", status_code=200, tags=["training"])
async def save_weights_for_sampler(data: JSONBody[SaveWeightsForSamplerRequest], gw: GatewayDep,
                                   tenant: TenantDep) -> UntypedFuture:
    run = await gw.live_run(data.model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        metadata = dict(data.user_metadata or {})
        if data.path is not None:
            payload = p.SaveWeightsForSampler(name=checkpoint_name(data.path), ttl_seconds=data.ttl_seconds,
                                              user_metadata=metadata)
        elif data.sampling_session_seq_id is not None:
            session_id = run.session_id or session_of_model(data.model_id)
            payload = p.SaveWeightsForSampler(
                sampling_session_id=sampling_session_id_for(session_id, data.sampling_session_seq_id),
                ttl_seconds=data.ttl_seconds, user_metadata=metadata)
        else:
            raise FieldError("path", "give a checkpoint name (path) or sampling_session_seq_id for an ephemeral save")
        return EventType.SAVE_WEIGHTS_FOR_SAMPLER, payload

    return promise(await submit_training(gw, tenant, data.model_id, data.seq_id, checked,
                                         request_type=EventType.SAVE_WEIGHTS_FOR_SAMPLER))


@post("/api/v1/load_weights", status_code=200, tags=["training"],
      summary="Create a model from a training-state checkpoint (session_id + model_seq_id), or load into one")
async def load_weights(data: JSONBody[LoadWeightsRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    if data.session_id is not None and data.model_seq_id is not None:
        await gw.session(data.session_id, tenant)
        model_id, seq_id = model_id_for(data.session_id, data.model_seq_id), 0
    elif data.model_id is not None:
        await gw.live_run(data.model_id, tenant)
        model_id, seq_id = data.model_id, data.seq_id
    else:
        raise FieldError("model_id", "give session_id + model_seq_id (new model) or model_id + seq_id")

    async def checked() -> tuple[EventType, msgspec.Struct]:
        path = parse_path(data.path)
        if path.kind != "weights":
            raise FieldError("path", "load_weights needs a training-state path tinker://<run>/weights/<name>")
        try:
            await gw.run(path.run_id, tenant)
            info = await asyncio.to_thread(gw.checkpoints.info, path)
        except (NotFound, CheckpointNotFound) as exc:
            raise FieldError("path", f"no checkpoint {path} (or it is not yours)", status_code=404) from exc
        if data.base_model is not None and data.base_model != info.base_model:
            raise FieldError("base_model", f"checkpoint {path} was trained on {info.base_model!r}, "
                                           f"not {data.base_model!r}")
        _check_optimizer(data.optimizer_config)
        return EventType.LOAD_WEIGHTS, p.LoadWeights(
            path=str(path), optimizer=data.optimizer, base_model=data.base_model or info.base_model,
            session_id=data.session_id, user_metadata=dict(data.user_metadata or {}))

    return promise(await submit_training(gw, tenant, model_id, seq_id, checked, request_type=EventType.LOAD_WEIGHTS))


@post("/api/v1/unload_model", status_code=200, tags=["training"])
async def unload_model(data: JSONBody[UnloadModelRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    await gw.live_run(data.model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        return EventType.UNLOAD_MODEL, p.UnloadModel()

    return promise(await submit_training(gw, tenant, data.model_id, None, checked))


ROUTES = [create_model, get_info, forward_backward, optim_step, save_weights, save_weights_for_sampler,
          load_weights, unload_model]
