"""Training runs and checkpoints (tinker-protocol.md 2.5), read straight from the artifact store.

The SDK's checkpoint_id is `<kind>/<name>` (it contains a slash), so routes take it as two segments.
Ephemeral sampler saves (names starting `ephemeral-`) are internal and never listed.
Only the owner lists, deletes or changes a checkpoint; reading one (weights_info, loading, sampling, download
URLs, copying) is also open to other tenants once its owner published it (checkpoint_sharing.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from litestar import delete, get, post, put
from litestar.params import FromPath, JSONBody, QueryParameter

from artifact_store import CheckpointInfo, CheckpointNotFound, TinkerPath, TrainingRun
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.schemas import (
    CheckpointOut,
    CheckpointsList,
    CheckpointTtlRequest,
    Cursor,
    TrainingRunOut,
    TrainingRunsList,
    WeightsInfoRequest,
    WeightsInfoResponse,
)
from bus_gateway.validation import EPHEMERAL_PREFIX, parse_path

PageLimit = Annotated[int, QueryParameter(ge=1, le=1000)]
PageOffset = Annotated[int, QueryParameter(ge=0)]


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def checkpoint_out(info: CheckpointInfo) -> CheckpointOut:
    return msgspec.convert(info.as_tinker_json(), CheckpointOut)


async def visible_checkpoints(gw: Gateway, run_id: str) -> list[CheckpointInfo]:
    infos = await asyncio.to_thread(gw.checkpoints.list_run, run_id)
    return [i for i in infos if not i.path.name.startswith(EPHEMERAL_PREFIX)]


async def training_run_out(gw: Gateway, run: TrainingRun) -> TrainingRunOut:
    infos = await visible_checkpoints(gw, run.model_id)
    last = {kind: next((checkpoint_out(i) for i in reversed(infos) if i.path.kind == kind), None)
            for kind in ("weights", "sampler_weights")}
    return TrainingRunOut(
        training_run_id=run.model_id, base_model=run.base_model, model_owner=run.tenant, is_lora=True,
        last_request_time=iso(run.last_request_time), lora_rank=run.lora_rank,
        last_checkpoint=last["weights"], last_sampler_checkpoint=last["sampler_weights"],
        user_metadata={k: str(v) for k, v in run.user_metadata.items()} or None,
    )


async def owned_checkpoint(gw: Gateway, tenant: str, path: TinkerPath) -> CheckpointInfo:
    await gw.run(path.run_id, tenant)
    try:
        return await asyncio.to_thread(gw.checkpoints.info, path)
    except CheckpointNotFound as exc:
        raise NotFound(f"checkpoint {path} not found") from exc


async def readable_checkpoint(gw: Gateway, tenant: str, path: TinkerPath) -> tuple[CheckpointInfo, TrainingRun]:
    """A checkpoint the caller may read, and the run that holds it: the caller's own, or one its owner published.
    Any other looks exactly like a missing one (404). Publication is read on every call, never cached, so
    unpublishing revokes at once."""
    try:
        info = await asyncio.to_thread(gw.checkpoints.info, path, True)
    except CheckpointNotFound as exc:
        raise NotFound(f"checkpoint {path} not found") from exc
    if not info.public:
        return info, await gw.run(path.run_id, tenant)
    run = await asyncio.to_thread(gw.registry.get_run, path.run_id)
    if run is None:
        raise NotFound(f"checkpoint {path} not found")
    return info, run


def checkpoint_path(run_id: str, kind: str, name: str) -> TinkerPath:
    return parse_path(f"tinker://{run_id}/{kind}/{name}", "checkpoint_id")


@get("/api/v1/training_runs/{run_id:str}", tags=["checkpoints"])
async def get_training_run(run_id: PathId, gw: GatewayDep, tenant: TenantDep) -> TrainingRunOut:
    return await training_run_out(gw, await gw.run(run_id, tenant, fresh=True))


@get("/api/v1/training_runs", tags=["checkpoints"])
async def list_training_runs(gw: GatewayDep, tenant: TenantDep, limit: PageLimit = 20,
                             offset: PageOffset = 0) -> TrainingRunsList:
    runs = await asyncio.to_thread(gw.registry.list_runs, tenant)
    page = [await training_run_out(gw, run) for run in runs[offset:offset + limit]]
    return TrainingRunsList(training_runs=page, cursor=Cursor(offset=offset, limit=limit, total_count=len(runs)))


@get("/api/v1/training_runs/{run_id:str}/checkpoints", tags=["checkpoints"])
async def list_checkpoints(run_id: PathId, gw: GatewayDep, tenant: TenantDep) -> CheckpointsList:
    await gw.run(run_id, tenant)
    return CheckpointsList(checkpoints=[checkpoint_out(i) for i in await visible_checkpoints(gw, run_id)])


@get("/api/v1/checkpoints", tags=["checkpoints"])
async def list_user_checkpoints(gw: GatewayDep, tenant: TenantDep, limit: PageLimit = 20,
                                offset: PageOffset = 0) -> CheckpointsList:
    runs = await asyncio.to_thread(gw.registry.list_runs, tenant)
    infos = [info for run in runs for info in await visible_checkpoints(gw, run.model_id)]
    infos.sort(key=lambda i: i.created_at, reverse=True)
    return CheckpointsList(checkpoints=[checkpoint_out(i) for i in infos[offset:offset + limit]],
                           cursor=Cursor(offset=offset, limit=limit, total_count=len(infos)))


@delete("/api/v1/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}", status_code=200,
        tags=["checkpoints"])
async def delete_checkpoint(run_id: PathId, kind: FromPath[str], name: FromPath[str], gw: GatewayDep,
                            tenant: TenantDep) -> dict[str, str]:
    path = checkpoint_path(run_id, kind, name)
    await owned_checkpoint(gw, tenant, path)
    await asyncio.to_thread(gw.checkpoints.delete, path)
    return {"deleted": str(path)}


@put("/api/v1/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}/ttl", status_code=200,
     tags=["checkpoints"])
async def set_checkpoint_ttl(run_id: PathId, kind: FromPath[str], name: FromPath[str],
                             data: JSONBody[CheckpointTtlRequest], gw: GatewayDep,
                             tenant: TenantDep) -> dict[str, str]:
    path = checkpoint_path(run_id, kind, name)
    await owned_checkpoint(gw, tenant, path)
    await asyncio.to_thread(gw.checkpoints.set_ttl, path, data.ttl_seconds)
    return {"tinker_path": str(path)}


@post("/api/v1/weights_info", status_code=200, tags=["checkpoints"])
async def weights_info(data: JSONBody[WeightsInfoRequest], gw: GatewayDep, tenant: TenantDep) -> WeightsInfoResponse:
    info, run = await readable_checkpoint(gw, tenant, parse_path(data.tinker_path, "tinker_path"))
    return WeightsInfoResponse(base_model=info.base_model, is_lora=True, lora_rank=run.lora_rank,
                               train_unembed=run.lora.train_unembed, train_mlp=run.lora.train_mlp,
                               train_attn=run.lora.train_attn)


ROUTES = [get_training_run, list_training_runs, list_checkpoints, list_user_checkpoints, delete_checkpoint,
          set_checkpoint_ttl, weights_info]
