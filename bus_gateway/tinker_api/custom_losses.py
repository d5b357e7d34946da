"""POST /api/v1/create_custom_loss (SDK 0.38, when client/config says custom_loss_server_side): check the traced
loss against loss_plugins.custom_graph's closed lists and store it in the object store under its session. A
forward_backward with loss_fn "custom" and loss_fn_config {"loss_id"} then carries the stored graph in its event
(custom_graph.loss_config), so the trainer and a replay need nothing but the event.

The promise it answers is settled at once and kept nowhere but the store: its request id names the loss, so any
gateway answers retrieve_future for it (`settled_future`), with no bus round trip for a call no worker serves.
"""

from __future__ import annotations

import asyncio

import msgspec
from litestar import post
from litestar.params import JSONBody

from bus_events import payloads as p
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.schemas import Body, Id, NonNegative, UntypedFuture
from loss_plugins.custom_graph import LOSS_ID, CustomLossError, loss_config, parse_custom_loss
from loss_plugins.registry import CUSTOM

REQUEST_PREFIX = "custom-loss:"  # request ids of create_custom_loss promises: the prefix, then the loss id


class CreateCustomLossRequest(Body):
    session_id: Id
    custom_loss_seq_id: NonNegative
    name: str
    inputs: list[dict]
    graph: dict
    type: str = "create_custom_loss"


class _Stored(msgspec.Struct):
    tenant: str
    session_id: str
    loss_id: str
    loss: str  # CustomLoss.to_json()


def _key(loss_id: str) -> str:
    return f"custom_losses/{loss_id}.json"


def _loss_id(session_id: str, seq: int) -> str:
    return f"{session_id}:loss:{seq}"


async def _stored(gw: Gateway, loss_id: str, tenant: str) -> _Stored | None:
    raw = await asyncio.to_thread(gw.objects.get_bytes_or_none, _key(loss_id))
    if raw is None:
        return None
    stored = msgspec.json.decode(raw, type=_Stored)
    return stored if stored.tenant == tenant else None  # another tenant's loss is reported like a missing one


@post("/api/v1/create_custom_loss", status_code=200, tags=["training"],
      summary="Store a traced custom loss (checked against the allowed operations); the promise gives its loss_id")
async def create_custom_loss(data: JSONBody[CreateCustomLossRequest], gw: GatewayDep,
                             tenant: TenantDep) -> UntypedFuture:
    await gw.session(data.session_id, tenant)
    try:
        loss = parse_custom_loss(data.name, data.inputs, data.graph)
    except CustomLossError as exc:
        raise FieldError(exc.field, exc.detail) from exc
    loss_id = _loss_id(data.session_id, data.custom_loss_seq_id)
    record = _Stored(tenant=tenant, session_id=data.session_id, loss_id=loss_id, loss=loss.to_json())
    async with gw.lock("custom_loss", loss_id):
        existing = await asyncio.to_thread(gw.objects.get_bytes_or_none, _key(loss_id))
        if existing is not None and msgspec.json.decode(existing, type=_Stored) != record:
            raise FieldError("custom_loss_seq_id", f"{data.custom_loss_seq_id} already names another loss of "
                                                   f"session {data.session_id!r}", status_code=409)
        if existing is None:
            await asyncio.to_thread(gw.objects.put_bytes, _key(loss_id), msgspec.json.encode(record),
                                    "application/json")
    return UntypedFuture(request_id=REQUEST_PREFIX + loss_id)


async def settled_future(gw: Gateway, request_id: str, tenant: str) -> dict[str, str] | None:
    """The result of a create_custom_loss promise, or None when `request_id` is not one."""
    if not request_id.startswith(REQUEST_PREFIX):
        return None
    stored = await _stored(gw, request_id.removeprefix(REQUEST_PREFIX), tenant)
    if stored is None:
        return {"error": f"no custom loss for request {request_id!r}", "category": "user"}
    return {"loss_id": stored.loss_id, "type": "create_custom_loss"}


async def with_custom_loss(gw: Gateway, tenant: str, session_id: str | None, fb: p.ForwardBackward
                           ) -> p.ForwardBackward:
    """`fb` with its custom loss's graph in loss_fn_config (unchanged unless loss_fn is "custom")."""
    if fb.loss_fn != CUSTOM:
        return fb
    loss_id = fb.loss_fn_config.get(LOSS_ID)
    field = f"loss_fn_config.{LOSS_ID}"
    if not isinstance(loss_id, str):
        raise FieldError(field, "loss_fn 'custom' needs the loss_id create_custom_loss returned")
    stored = await _stored(gw, loss_id, tenant)
    if stored is None or stored.session_id != session_id:
        raise FieldError(field, f"no custom loss {loss_id!r} in this model's session", status_code=404)
    extra = sorted(set(fb.loss_fn_config) - {LOSS_ID})
    if extra:
        raise FieldError(f"loss_fn_config.{extra[0]}", "loss_fn 'custom' takes only loss_id")
    return msgspec.structs.replace(fb, loss_fn_config=loss_config(loss_id, stored.loss))


ROUTES = [create_custom_loss]
