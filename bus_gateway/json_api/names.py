"""Adapter names on the JSON API: a name the caller has not used yet is created on its first training call (or
by /add_lora) as an ordinary model, with the id bus_gateway.adapter_names derives from (tenant, name)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from artifact_store import Session
from bus_events import payloads as p
from bus_events.ids import is_model_id, session_of_model
from bus_gateway import submit
from bus_gateway.adapter_names import AdapterName, named_model_id
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.futures import Future
from bus_gateway.gateway import Gateway
from bus_gateway.json_api.schemas import DEFAULT_RANK

ADAPTER_NAME_KEY = "adapter_name"  # in the model's user_metadata: the name it was created under
MODEL_REF = "model_ref"  # in a future's context: the model as the caller named it


@dataclass(frozen=True)
class NewAdapter:
    """How to create an adapter that does not exist yet (defaults: the original server's)."""

    base_model: str | None = None  # None: the first base model this server serves
    lora: p.LoraSpec = field(default_factory=lambda: p.LoraSpec(rank=DEFAULT_RANK))
    user_metadata: dict[str, Any] = field(default_factory=dict)


async def _is_live(gw: Gateway, record: AdapterName, tenant: str) -> bool | None:
    """True: the trainer made the model; False: it was unloaded since; None: not made yet (or it failed)."""
    try:
        run = await gw.run(record.model_id, tenant)
    except NotFound:
        return None
    return not run.unloaded


async def ensure_adapter(gw: Gateway, tenant: str, name: str, new: NewAdapter | None = None, *,
                         must_be_new: bool = False, field_name: str = "model_id") -> tuple[AdapterName, Future | None]:
    """The caller's adapter `name`, creating it if it does not exist (or was removed): its document and, when
    its model is not on the trainer yet, the create_model future. Until the trainer has made the model every
    call re-publishes the same create (deduplicated on its (model_id, 0)), so a gateway that crashed between
    writing the name and publishing cannot leave a name without a model."""
    async with gw.lock("adapter", tenant, name):
        record = await gw.adapter_name(name, tenant, field_name)
        live = None if record is None or record.removed else await _is_live(gw, record, tenant)
        if record is not None and not record.removed and live is not False:
            if must_be_new:
                raise FieldError(field_name, f"adapter {name!r} already exists (remove it first, or train it "
                                             "by name: the first /fwdbwd of a new name creates it)", 409)
            if live:
                return record, None
        else:
            record = await _new_record(gw, tenant, name, new or NewAdapter(), record)
        session = Session(session_id=session_of_model(record.model_id), tenant=tenant, tags=["json-api"])
        await asyncio.to_thread(gw.registry.put_session, session)
        gw.remember_session(session)
        return record, await submit.create_model(gw, tenant, record.model_id, lambda: _create(record),
                                                 context={MODEL_REF: name})


async def _new_record(gw: Gateway, tenant: str, name: str, new: NewAdapter,
                      previous: AdapterName | None) -> AdapterName:
    base_model = new.base_model or gw.settings.base_models[0]
    submit.require_served(gw, base_model)
    generation = 0 if previous is None else previous.generation + 1
    record = AdapterName(name=name, tenant=tenant, model_id=named_model_id(tenant, name, generation),
                         base_model=base_model, lora=new.lora, user_metadata=dict(new.user_metadata),
                         generation=generation)
    await asyncio.to_thread(gw.adapter_names.put, record)
    return record


def _create(record: AdapterName) -> p.CreateModel:
    return p.CreateModel(base_model=record.base_model, lora=record.lora, session_id=session_of_model(record.model_id),
                         user_metadata={**record.user_metadata, ADAPTER_NAME_KEY: record.name})


async def training_target(gw: Gateway, tenant: str, ref: str) -> tuple[str, str]:
    """(model id, base model) for a training call: a live model id, or an adapter name (created on first use)."""
    if is_model_id(ref):
        return await gw.live_model(ref, tenant)
    record, _ = await ensure_adapter(gw, tenant, ref)
    return record.model_id, record.base_model


async def remove_adapter(gw: Gateway, tenant: str, ref: str) -> Future:
    """Unload the model `ref` names; a name is marked removed first, so its next use starts a fresh model."""
    if is_model_id(ref):
        await gw.live_run(ref, tenant)
        return await submit.unload(gw, tenant, ref)
    async with gw.lock("adapter", tenant, ref):
        record = await gw.adapter_name(ref, tenant)
        if record is None or record.removed:
            raise NotFound(f"adapter {ref!r} not found")
        record.removed = True
        await asyncio.to_thread(gw.adapter_names.put, record)
    return await submit.unload(gw, tenant, record.model_id)
