"""LoRA adapters on the JSON API, by the caller's names: create (/add_lora), list, remove."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated

from litestar import delete, get, post
from litestar.params import JSONBody, PathParameter

from bus_events import payloads as p
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.json_api.names import NewAdapter, ensure_adapter, remove_adapter
from bus_gateway.json_api.schemas import AdapterOut, Adapters, AddLoraRequest, JsonPromise, RemoveLoraRequest
from bus_gateway.validation import build

ModelRefPath = Annotated[str, PathParameter(min_length=1, max_length=256)]


@post("/add_lora", status_code=200, tags=["json-api"],
      summary="Create the LoRA adapter `model_id` (a name of yours; 409 if it exists). /fwdbwd creates unknown "
              "names by itself, with these defaults")
async def add_lora(data: JSONBody[AddLoraRequest], gw: GatewayDep, tenant: TenantDep) -> JsonPromise:
    name = data.model_id or f"adapter-{uuid.uuid4().hex[:12]}"
    lora = build(p.LoraSpec, "rank", **{field: getattr(data, field) for field in p.LoraSpec.__struct_fields__})
    new = NewAdapter(base_model=data.base_model, lora=lora, user_metadata=dict(data.user_metadata or {}))
    record, created = await ensure_adapter(gw, tenant, name, new, must_be_new=True)
    assert created is not None  # a new name always publishes its create_model
    return JsonPromise(request_id=created.request_id, model_id=record.name)


@get("/adapters", tags=["json-api"], summary="The caller's adapters: named ones by name, others by model id")
async def list_adapters(gw: GatewayDep, tenant: TenantDep) -> Adapters:
    records, runs = await asyncio.gather(asyncio.to_thread(gw.adapter_names.list, tenant),
                                         asyncio.to_thread(gw.registry.list_runs, tenant))
    live = {r.model_id: r for r in runs if not r.unloaded}
    named = {r.model_id: r for r in records if not r.removed}
    out = [AdapterOut(model_id=r.name, base_model=r.base_model, lora_rank=r.lora.rank, created_at=r.created_at,
                      training_run_id=r.model_id, session_id=live[r.model_id].session_id if r.model_id in live
                      else None) for r in named.values()]
    out += [AdapterOut(model_id=r.model_id, base_model=r.base_model, lora_rank=r.lora_rank, created_at=r.created_at,
                       training_run_id=r.model_id, session_id=r.session_id)
            for r in live.values() if r.model_id not in named]
    return Adapters(adapters=out)


@delete("/adapters/{model_id:str}", status_code=200, tags=["json-api"])
async def delete_adapter(model_id: ModelRefPath, gw: GatewayDep, tenant: TenantDep) -> JsonPromise:
    fut = await remove_adapter(gw, tenant, model_id)
    return JsonPromise(request_id=fut.request_id, model_id=model_id)


@post("/remove_lora", status_code=200, tags=["json-api"])
async def remove_lora(data: JSONBody[RemoveLoraRequest], gw: GatewayDep, tenant: TenantDep) -> JsonPromise:
    fut = await remove_adapter(gw, tenant, data.model_id)
    return JsonPromise(request_id=fut.request_id, model_id=data.model_id)


ROUTES = [add_lora, list_adapters, delete_adapter, remove_lora]
