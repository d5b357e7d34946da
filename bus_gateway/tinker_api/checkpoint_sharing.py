"""Sharing checkpoints: publish / unpublish (tinker-protocol.md 2.5), copy_weights, and SDK 0.39's
search_checkpoints.

Publishing makes a checkpoint readable by every tenant (weights_info, load_weights, sampling, download URLs,
copy_weights) until its owner unpublishes it; only the owner lists, deletes or changes it. A copy is a new
checkpoint of the caller's, in a new training run that cannot be trained on, copied inside the object store.

No 409s here: the SDK documents 409 for publishing a public checkpoint, but it retries every 409 for five
minutes before raising it, so an already public (or already private) checkpoint answers 200 with its state.

search_checkpoints: SDK 0.39's request shape was not available to us; this is the shape of 0.38's
`POST /api/v1/sessions/search` applied to checkpoints (filters, `owner`, `limit`, an opaque `next_cursor`).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Request, delete, post
from litestar.params import FromPath, JSONBody

from artifact_store import CheckpointInfo, TinkerPath, TrainingRun
from artifact_store.paths import CHECKPOINT_TYPES
from bus_events.ids import model_id_for
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.checkpoints import (
    checkpoint_out,
    checkpoint_path,
    owned_checkpoint,
    readable_checkpoint,
    visible_checkpoints,
)
from bus_gateway.tinker_api.schemas import Body, CheckpointOut, Id, NonNegative, Reply
from bus_gateway.validation import parse_path

# The SDK documents copy TTLs of 1 hour to 10 years.
COPY_TTL_S = (3600, 10 * 365 * 86400)
CHECKPOINT_ROUTE = "/api/v1/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}"


# ------------------------------------------------------------------ publish / unpublish
class Publication(Reply):
    tinker_path: str
    public: bool
    changed: bool  # false: it already was public (publish) or private (unpublish)


async def _set_public(gw: Gateway, tenant: str, path: TinkerPath, public: bool) -> Publication:
    await owned_checkpoint(gw, tenant, path)
    change = gw.checkpoints.publications.publish if public else gw.checkpoints.publications.unpublish
    return Publication(tinker_path=str(path), public=public, changed=await asyncio.to_thread(change, path))


@post(f"{CHECKPOINT_ROUTE}/publish", status_code=200, tags=["checkpoints"])
async def publish_checkpoint(run_id: PathId, kind: FromPath[str], name: FromPath[str], gw: GatewayDep,
                             tenant: TenantDep) -> Publication:
    """Readable by every tenant from now on."""
    return await _set_public(gw, tenant, checkpoint_path(run_id, kind, name), True)


@delete(f"{CHECKPOINT_ROUTE}/publish", status_code=200, tags=["checkpoints"])
async def unpublish_checkpoint(run_id: PathId, kind: FromPath[str], name: FromPath[str], gw: GatewayDep,
                               tenant: TenantDep) -> Publication:
    """Private again: other tenants' next read of it is a 404, download URLs they hold included."""
    return await _set_public(gw, tenant, checkpoint_path(run_id, kind, name), False)


# ------------------------------------------------------------------ copy_weights
class CopyWeightsRequest(Body):
    source_path: str
    destination_project_id: str | None = None
    session_id: Id | None = None
    model_seq_id: NonNegative | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None


class CopyWeightsResponse(msgspec.Struct):
    tinker_path: str


async def _copy_destination(gw: Gateway, tenant: str, data: CopyWeightsRequest, source: TinkerPath,
                            idempotency_key: str | None) -> str:
    """The model id of the copy's run. A retry (same session slot, or same idempotency key) names the same run,
    so it lands on the same path instead of making a second copy."""
    if data.session_id is not None and data.model_seq_id is not None:
        await gw.session(data.session_id, tenant)
        model_id = model_id_for(data.session_id, data.model_seq_id)
        existing = await asyncio.to_thread(gw.registry.get_run, model_id)
        if existing is not None and (existing.tenant != tenant or existing.copied_from != str(source)):
            raise FieldError("model_seq_id", f"model {model_id!r} already exists; a copy needs an unused slot")
        return model_id
    if data.destination_project_id is None:
        raise FieldError("destination_project_id", "give destination_project_id, or session_id + model_seq_id")
    seed = idempotency_key or uuid.uuid4().hex
    digest = hashlib.sha256(f"{tenant}\0{data.destination_project_id}\0{source}\0{seed}".encode()).hexdigest()
    return model_id_for(f"copy-{digest[:24]}", 0)


@post("/api/v1/copy_weights", status_code=200, tags=["checkpoints"])
async def copy_weights(data: JSONBody[CopyWeightsRequest], request: Request, gw: GatewayDep,
                       tenant: TenantDep) -> CopyWeightsResponse:
    if data.weights_access_token or request.headers.get("x-tinker-weights-access-token"):
        raise FieldError("weights_access_token", "access tokens are not supported here: the owner publishes the "
                                                 "checkpoint, then anyone can copy it without one")
    if data.ttl_seconds is not None and not COPY_TTL_S[0] <= data.ttl_seconds <= COPY_TTL_S[1]:
        raise FieldError("ttl_seconds", f"must be {COPY_TTL_S[0]} to {COPY_TTL_S[1]} seconds, got {data.ttl_seconds}")
    source = parse_path(data.source_path, "source_path")
    try:
        info, source_run = await readable_checkpoint(gw, tenant, source)
    except NotFound as exc:
        raise FieldError("source_path", f"no checkpoint {source} (or it is not yours)", status_code=404) from exc
    model_id = await _copy_destination(gw, tenant, data, source, request.headers.get("x-idempotency-key"))
    run = TrainingRun(model_id=model_id, base_model=info.base_model, tenant=tenant, lora=source_run.lora,
                      session_id=data.session_id, unloaded=True, copied_from=str(source))
    destination = TinkerPath(model_id, source.kind, source.name)
    await asyncio.to_thread(gw.registry.put_run, run)
    await asyncio.to_thread(gw.checkpoints.copy, source, destination, ttl_seconds=data.ttl_seconds)
    return CopyWeightsResponse(tinker_path=str(destination))


# ------------------------------------------------------------------ search_checkpoints (SDK 0.39)
class SearchOwner(Body):
    type: Literal["own", "accessible"] = "own"  # accessible: the caller's and every published checkpoint


class CheckpointSearchCursor(msgspec.Struct):
    last_time: str
    last_tinker_path: str


class CheckpointSearchRequest(Body):
    tinker_path: str | None = None
    training_run_id: str | None = None
    checkpoint_types: list[Literal["training", "sampler", "external"]] | None = None
    name: str | None = None  # case-insensitive substring of the checkpoint's name
    base_model: str | None = None
    public: bool | None = None
    user_metadata: dict[str, str] = msgspec.field(default_factory=dict)
    owner: SearchOwner = msgspec.field(default_factory=SearchOwner)
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50
    cursor: CheckpointSearchCursor | None = None


class CheckpointSearchResponse(Reply):
    checkpoints: list[CheckpointOut]
    next_cursor: CheckpointSearchCursor | None = None


def _matches(info: CheckpointInfo, q: CheckpointSearchRequest) -> bool:
    return ((q.tinker_path is None or str(info.path) == q.tinker_path)
            and (q.training_run_id is None or info.path.run_id == q.training_run_id)
            and (q.checkpoint_types is None or CHECKPOINT_TYPES[info.path.kind] in q.checkpoint_types)
            and (q.name is None or q.name.lower() in info.path.name.lower())
            and (q.base_model is None or info.base_model == q.base_model)
            and (q.public is None or info.public == q.public)
            and all(info.user_metadata.get(k) == v for k, v in q.user_metadata.items()))


async def _candidates(gw: Gateway, tenant: str, accessible: bool) -> list[CheckpointInfo]:
    runs = await asyncio.to_thread(gw.registry.list_runs, tenant)
    found = {i.path: i for run in runs for i in await visible_checkpoints(gw, run.model_id)}
    if accessible:
        for path in await asyncio.to_thread(gw.checkpoints.publications.published):
            if path not in found:
                try:
                    found[path] = (await readable_checkpoint(gw, tenant, path))[0]
                except NotFound:
                    continue  # unpublished or deleted since it was listed
    return list(found.values())


def _order(time: str, tinker_path: str) -> tuple[float, str]:
    """Newest first, ties by path; both sides of a cursor comparison are parsed from the same ISO strings."""
    return -datetime.fromisoformat(time).timestamp(), tinker_path


@post("/api/v1/checkpoints/search", status_code=200, tags=["checkpoints"],
      summary="SDK 0.39 search_checkpoints: the caller's checkpoints (and with owner=accessible the published ones)"
              ", newest first")
async def search_checkpoints(data: JSONBody[CheckpointSearchRequest], gw: GatewayDep,
                             tenant: TenantDep) -> CheckpointSearchResponse:
    infos = [i for i in await _candidates(gw, tenant, data.owner.type == "accessible") if _matches(i, data)]
    rows = sorted((checkpoint_out(i) for i in infos), key=lambda out: _order(out.time, out.tinker_path))
    if data.cursor is not None:
        try:
            after = _order(data.cursor.last_time, data.cursor.last_tinker_path)
        except ValueError as exc:
            raise FieldError("cursor.last_time", f"not an ISO time: {exc}") from exc
        rows = [out for out in rows if _order(out.time, out.tinker_path) > after]
    page = rows[:data.limit]
    more = len(rows) > data.limit
    return CheckpointSearchResponse(checkpoints=page, next_cursor=CheckpointSearchCursor(
        last_time=page[-1].time, last_tinker_path=page[-1].tinker_path) if more else None)


ROUTES = [publish_checkpoint, unpublish_checkpoint, copy_weights, search_checkpoints]
