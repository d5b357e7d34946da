"""The original server's JSON API, on the same bus: chat conversations in, loss and metrics out.

Legacy training events carry seq_id None (the trainer applies them in arrival order); every adapter made with
/add_lora is a model of its own session `legacy-<hex>`, so its id still has the `{session}:train:{n}` form.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from typing import Any

import msgspec
import numpy as np
from litestar import Request, Response, delete, get, post
from litestar.params import JSONBody

from artifact_store import Session
from bus_events import EventType, tensor_from_numpy
from bus_events import payloads as p
from bus_gateway.chat_data import tokenize_conversation
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.futures import Future
from bus_gateway.legacy_schemas import (
    AdapterOut,
    Adapters,
    AddLoraRequest,
    JsonForwardBackward,
    JsonOptimStep,
    LegacyPromise,
    LegacyResult,
    LegacyRetrieve,
    LossFunctionOut,
    LossFunctions,
    RemoveLoraRequest,
)
from bus_gateway.results import MalformedResult, failure, forward_backward_result, json_body
from bus_gateway.state import Gateway
from bus_gateway.tinker_api.common import build, model_id_for, promise, submit_training
from bus_gateway.tinker_api.futures_api import find_future, wait_done
from bus_gateway.tinker_api.schemas import AdamParamsIn, UntypedFuture
from bus_gateway.tinker_api.training import submit_forward_backward, submit_optim_step
from loss_plugins import list_losses

MASKS = "assistant_masks"


def _legacy_promise(fut: Future) -> LegacyPromise:
    return LegacyPromise(request_id=fut.request_id, model_id=fut.model_id)


# ------------------------------------------------------------------ forward_backward from conversations
def _input_values(value: list[float] | float, mask: np.ndarray, field: str) -> np.ndarray:
    if isinstance(value, list):
        if len(value) != mask.size:
            raise FieldError(field, f"has {len(value)} values but the conversation's model_input has {mask.size} "
                                    "tokens (its token count minus one)")
        return np.asarray(value, dtype=np.float64)
    return mask.astype(np.float64) * value  # one number per conversation: spread over its assistant tokens


def _datums(tokenizer: Any, data: JsonForwardBackward) -> tuple[list[p.Datum], list[list[float]]]:
    datums, masks = [], []
    inputs = data.loss_fn_inputs or {}
    for name, per_conversation in inputs.items():
        if len(per_conversation) != len(data.data):
            raise FieldError(f"loss_fn_inputs.{name}", f"has {len(per_conversation)} entries for "
                                                      f"{len(data.data)} conversations")
    for i, conversation in enumerate(data.data):
        messages = [{"role": m.role, "content": m.content} for m in conversation]
        ids, assistant = tokenize_conversation(tokenizer, messages, f"data[{i}]")
        mask = assistant[1:]  # position t predicts token t+1: weight the predictions of assistant tokens
        fields = {"target_tokens": ids[1:].astype(np.float64), "weights": mask.astype(np.float64)}
        for name, per_conversation in inputs.items():
            fields[name] = _input_values(per_conversation[i], mask, f"loss_fn_inputs.{name}[{i}]")
        target = fields.pop("target_tokens")
        if np.any(target != np.round(target)):
            raise FieldError(f"loss_fn_inputs.target_tokens[{i}]", "token ids must be integers")
        wire = {"target_tokens": tensor_from_numpy(target.astype(np.int64), "int64")}
        wire |= {name: tensor_from_numpy(values, "float32") for name, values in fields.items()}
        datums.append(p.Datum(tokens=tensor_from_numpy(ids[:-1], "int32"), loss_fn_inputs=wire))
        masks.append(mask.tolist())
    return datums, masks


async def submit_json_forward_backward(data: JsonForwardBackward, gw: Gateway, tenant: str) -> Future:
    run = await gw.live_run(data.model_id, tenant)
    tokenizer = await gw.base_models.tokenizer(run.base_model)
    datums, masks = await asyncio.to_thread(_datums, tokenizer, data)
    payload = p.ForwardBackward(data=datums, loss_fn=data.loss_fn, loss_fn_config=dict(data.loss_fn_config or {}),
                                forward_only=data.forward_only)
    return await submit_forward_backward(gw, tenant, data.model_id, data.seq_id, payload, context={MASKS: masks})


async def json_forward_backward(request: Request, gw: Gateway, tenant: str) -> UntypedFuture:
    """JSON bodies POSTed to /api/v1/forward_backward (the route itself reads protobuf too)."""
    try:
        data = msgspec.json.decode(await request.body(), type=JsonForwardBackward)
    except msgspec.DecodeError as exc:  # ValidationError included: its message names the field ($.data[0]...)
        raise FieldError("body", str(exc)) from exc
    return promise(await submit_json_forward_backward(data, gw, tenant))


@post("/fwdbwd", status_code=200, tags=["json-api"],
      summary="forward_backward on chat conversations (loss weight 1 on assistant turns)")
async def fwdbwd(data: JSONBody[JsonForwardBackward], gw: GatewayDep, tenant: TenantDep) -> LegacyPromise:
    return _legacy_promise(await submit_json_forward_backward(data, gw, tenant))


@post("/optim_step", status_code=200, tags=["json-api"])
async def legacy_optim_step(data: JSONBody[JsonOptimStep], gw: GatewayDep, tenant: TenantDep) -> LegacyPromise:
    params = data.adam_params
    if data.learning_rate is not None:
        params = msgspec.structs.replace(params or AdamParamsIn(), learning_rate=data.learning_rate)
    return _legacy_promise(await submit_optim_step(gw, tenant, data.model_id, data.seq_id, params, "adam_params"))


# ------------------------------------------------------------------ results
def _nll_metrics(fut: Future) -> tuple[float | None, dict[str, float]]:
    result = forward_backward_result(fut)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    masks = fut.context.get(MASKS)
    total, count = 0.0, 0.0
    for i, outputs in enumerate(result.outputs):
        if "logprobs" not in outputs:
            continue
        logprobs = outputs["logprobs"].numpy().astype(np.float64).reshape(-1)
        weights = np.asarray(masks[i], dtype=np.float64) if masks and i < len(masks) else np.ones_like(logprobs)
        if weights.size == logprobs.size:
            total -= float(np.dot(weights, logprobs))
            count += float(weights.sum())
    if count > 0:
        metrics["mean_nll"] = total / count
        metrics["perplexity"] = math.exp(min(metrics["mean_nll"], 700.0))
    return metrics.get("loss:sum"), metrics


def legacy_result(fut: Future) -> LegacyResult:
    if not fut.done.is_set():
        return LegacyResult(status="pending", request_id=fut.request_id, request_type=fut.request_type)
    try:
        failed = failure(fut)
        if failed is not None:
            return LegacyResult(status="failed", request_id=fut.request_id, request_type=fut.request_type, **failed)
        loss, metrics = (_nll_metrics(fut) if fut.request_type == EventType.FORWARD_BACKWARD else (None, None))
        return LegacyResult(status="complete", request_id=fut.request_id, request_type=fut.request_type,
                            result=json_body(fut), loss=loss, metrics=metrics)
    except MalformedResult as exc:
        return LegacyResult(status="failed", request_id=fut.request_id, error=str(exc), category="server")


@post("/retrieve_future", status_code=200, tags=["json-api"],
      summary="Wait up to `timeout` s; 202 while pending, then the result (with loss and metrics for fwdbwd)")
async def legacy_retrieve_future(data: JSONBody[LegacyRetrieve], gw: GatewayDep,
                                 tenant: TenantDep) -> Response[LegacyResult]:
    fut = await find_future(gw, data.request_id, tenant)
    await wait_done(fut, min(data.timeout, gw.config.long_poll_s))
    result = legacy_result(fut)
    return Response(result, status_code=202 if result.status == "pending" else 200)


@get("/loss_functions", tags=["json-api"])
async def loss_functions() -> LossFunctions:
    specs = await asyncio.to_thread(list_losses)  # first call loads entry-point plugins
    return LossFunctions(loss_functions=[
        LossFunctionOut(name=s.name, description=s.description, required_inputs=list(s.required_inputs),
                        optional_inputs=dict(s.input_defaults), config_defaults=dict(s.config_defaults))
        for s in specs])


# ------------------------------------------------------------------ adapters
@post("/add_lora", status_code=200, tags=["json-api"], summary="Create a LoRA adapter (a model of its own)")
async def add_lora(data: JSONBody[AddLoraRequest], gw: GatewayDep, tenant: TenantDep) -> LegacyPromise:
    base_model = data.base_model or gw.settings.base_models[0]
    if not gw.base_models.is_served(base_model):
        raise FieldError("base_model", f"{base_model!r} is not served here (served: "
                                       f"{', '.join(gw.settings.base_models)})")
    lora = build(p.LoraSpec, "rank", rank=data.rank, seed=data.seed, train_attn=data.train_attn,
                 train_mlp=data.train_mlp, train_unembed=data.train_unembed)
    session = Session(session_id=f"legacy-{uuid.uuid4().hex[:16]}", tenant=tenant, tags=["json-api"])
    await asyncio.to_thread(gw.registry.put_session, session)
    gw.remember_session(session)
    model_id = model_id_for(session.session_id, 0)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        return EventType.CREATE_MODEL, p.CreateModel(base_model=base_model, lora=lora, session_id=session.session_id,
                                                     user_metadata=dict(data.user_metadata or {}))

    return _legacy_promise(await submit_training(gw, tenant, model_id, 0, checked))


@get("/adapters", tags=["json-api"])
async def list_adapters(gw: GatewayDep, tenant: TenantDep) -> Adapters:
    runs = await asyncio.to_thread(gw.registry.list_runs, tenant)
    return Adapters(adapters=[AdapterOut(model_id=r.model_id, base_model=r.base_model, lora_rank=r.lora_rank,
                                         created_at=r.created_at, session_id=r.session_id)
                              for r in runs if not r.unloaded])


async def _unload(model_id: str, gw: Gateway, tenant: str) -> LegacyPromise:
    await gw.live_run(model_id, tenant)

    async def checked() -> tuple[EventType, msgspec.Struct]:
        return EventType.UNLOAD_MODEL, p.UnloadModel()

    return _legacy_promise(await submit_training(gw, tenant, model_id, None, checked))


@delete("/adapters/{model_id:str}", status_code=200, tags=["json-api"])
async def delete_adapter(model_id: PathId, gw: GatewayDep, tenant: TenantDep) -> LegacyPromise:
    return await _unload(model_id, gw, tenant)


@post("/remove_lora", status_code=200, tags=["json-api"])
async def remove_lora(data: JSONBody[RemoveLoraRequest], gw: GatewayDep, tenant: TenantDep) -> LegacyPromise:
    return await _unload(data.model_id, gw, tenant)


ROUTES = [fwdbwd, legacy_optim_step, legacy_retrieve_future, loss_functions, add_lora, list_adapters,
          delete_adapter, remove_lora]
