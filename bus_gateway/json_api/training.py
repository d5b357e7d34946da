"""The original server's JSON API for training: chat conversations in, a request_id at once, and loss plus the
loss's own metrics (mean_nll, perplexity) from /retrieve_future.

`model_id` is the caller's adapter name, created on its first /fwdbwd (or an ordinary model id). JSON training
events carry seq_id None: the trainer applies them in arrival order.
"""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Request, Response, get, post
from litestar.params import JSONBody

from bus_events import EventType
from bus_events import payloads as p
from bus_gateway import submit
from bus_gateway.body_parsing import decode_body
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import NotYetKnown
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.json_api.datums import conversation_datums
from bus_gateway.json_api.names import MODEL_REF, training_target
from bus_gateway.json_api.schemas import (
    JsonForwardBackward,
    JsonOptimStep,
    JsonPromise,
    JsonResult,
    JsonRetrieve,
    LossFunctionOut,
    LossFunctions,
)
from bus_gateway.results import MalformedResult, failure, forward_backward_json, forward_backward_result, json_body
from bus_gateway.tinker_api.schemas import AdamParamsIn
from loss_plugins import list_losses

LOSS_METRIC = "loss:sum"
# The documented top-level metrics, as the loss itself reports them (loss_plugins.builtin.cross_entropy).
DOCUMENTED_METRICS = {"mean_nll": "mean_nll:mean", "perplexity": "perplexity:mean"}


def json_promise(fut: Future) -> JsonPromise:
    return JsonPromise(request_id=fut.request_id, model_id=fut.context.get(MODEL_REF, fut.model_id))


# ------------------------------------------------------------------ forward_backward from conversations
async def submit_json_forward_backward(data: JsonForwardBackward, gw: Gateway, tenant: str) -> Future:
    model_id, base_model = await training_target(gw, tenant, data.model_id)
    tokenizer = await gw.base_models.tokenizer(base_model)

    async def payload() -> p.ForwardBackward:
        datums = await asyncio.to_thread(conversation_datums, tokenizer, data)
        return p.ForwardBackward(data=datums, loss_fn=data.loss_fn, loss_fn_config=dict(data.loss_fn_config or {}),
                                 forward_only=data.forward_only)

    return await submit.forward_backward(gw, tenant, model_id, data.seq_id, base_model, payload,
                                         context={MODEL_REF: data.model_id})


async def json_forward_backward(request: Request, gw: Gateway, tenant: str) -> JsonPromise:
    """JSON bodies POSTed to /api/v1/forward_backward (the route reads the SDK's protobuf too)."""
    data = await decode_body(await request.body(), JsonForwardBackward)  # up to max_body_bytes: off the loop
    return json_promise(await submit_json_forward_backward(data, gw, tenant))


@post("/fwdbwd", status_code=200, tags=["json-api"],
      summary="forward_backward on chat conversations (loss weight 1 on assistant turns); a new model_id name "
              "creates that adapter")
async def fwdbwd(data: JSONBody[JsonForwardBackward], gw: GatewayDep, tenant: TenantDep) -> JsonPromise:
    return json_promise(await submit_json_forward_backward(data, gw, tenant))


@post("/optim_step", status_code=200, tags=["json-api"])
async def json_optim_step(data: JSONBody[JsonOptimStep], gw: GatewayDep, tenant: TenantDep) -> JsonPromise:
    params = data.adam_params
    if data.learning_rate is not None:
        params = msgspec.structs.replace(params or AdamParamsIn(), learning_rate=data.learning_rate)
    model_id, _ = await gw.live_model(data.model_id, tenant)
    fut = await submit.optim_step(gw, tenant, model_id, data.seq_id,
                                  lambda: p.OptimStep(adam_params=submit.adam_params(params)))
    return JsonPromise(request_id=fut.request_id, model_id=data.model_id)


# ------------------------------------------------------------------ results
def _complete(fut: Future) -> JsonResult:
    loss, metrics = None, None
    if fut.request_type == EventType.FORWARD_BACKWARD:
        result = forward_backward_result(fut)
        body = forward_backward_json(result)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        loss = metrics.get(LOSS_METRIC)
        metrics |= {name: metrics[wire] for name, wire in DOCUMENTED_METRICS.items() if wire in metrics}
    else:
        body = json_body(fut)
    if "model_id" in body and MODEL_REF in fut.context:
        body["model_id"] = fut.context[MODEL_REF]
    return JsonResult(status="complete", request_id=fut.request_id, request_type=fut.request_type, result=body,
                      loss=loss, metrics=metrics)


def json_result(fut: Future) -> JsonResult:
    if not fut.done.is_set():
        return JsonResult(status="pending", request_id=fut.request_id, request_type=fut.request_type)
    try:
        failed = failure(fut)
        if failed is not None:
            return JsonResult(status="failed", request_id=fut.request_id, request_type=fut.request_type,
                              error=failed["error"], category=failed["category"])
        return _complete(fut)
    except MalformedResult as exc:
        return JsonResult(status="failed", request_id=fut.request_id, error=str(exc), category="server")


@post("/retrieve_future", status_code=200, tags=["json-api"],
      summary="Wait up to `timeout` s; 202 while pending, then the result (with loss and metrics for fwdbwd)")
async def json_retrieve_future(data: JSONBody[JsonRetrieve], gw: GatewayDep,
                               tenant: TenantDep) -> Response[JsonResult]:
    try:
        fut = await gw.future(data.request_id, tenant)
    except NotYetKnown:  # this gateway (just restarted) is still reading the bus: pending, not unknown
        return Response(JsonResult(status="pending", request_id=data.request_id), status_code=202)
    await fut.wait(min(data.timeout, gw.config.long_poll_s))
    result = json_result(fut)
    return Response(result, status_code=202 if result.status == "pending" else 200)


@get("/loss_functions", tags=["json-api"])
async def loss_functions() -> LossFunctions:
    specs = await asyncio.to_thread(list_losses)  # first call loads entry-point plugins
    return LossFunctions(
        available_loss_functions=[s.name for s in specs],
        descriptions={s.name: s.description for s in specs},
        loss_functions=[LossFunctionOut(name=s.name, description=s.description,
                                        required_inputs=list(s.required_inputs),
                                        optional_inputs=dict(s.input_defaults), config_defaults=dict(s.config_defaults))
                        for s in specs])


ROUTES = [fwdbwd, json_optim_step, json_retrieve_future, loss_functions]
