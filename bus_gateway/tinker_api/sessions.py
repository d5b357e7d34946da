"""Bootstrap, sessions, telemetry, capabilities and health (tinker-protocol.md 1.4, 2.1). Reading and searching
sessions: session_queries.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

from litestar import Request, get, post
from litestar.exceptions import ClientException
from litestar.params import JSONBody

from artifact_store import Session
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.schemas import (
    ClientConfigRequest,
    ClientConfigResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    FinishSessionRequest,
    ServerCapabilities,
    SessionHeartbeatRequest,
    SessionHeartbeatResponse,
    StatusResponse,
    SupportedModel,
    TelemetryRequest,
)
from bus_runtime.health import read_health

log = logging.getLogger(__name__)


@post("/api/v1/client/config", status_code=200, tags=["session"])
async def client_config(data: JSONBody[ClientConfigRequest], gw: GatewayDep,
                        request: Request) -> ClientConfigResponse:
    client_host = request.client.host if request.client else None
    return ClientConfigResponse(
        pjwt_auth_enabled=gw.api_keys is not None,  # the key is exchanged for a JWT (tokens.py)
        use_pyqwest_transport=gw.config.sdk_pyqwest_transport,
        parallel_fwdbwd_chunks=gw.config.parallel_fwdbwd_chunks,
        proto_compress_fwdbwd=gw.config.compresses_fwdbwd_for(client_host),
        sample_use_retrieve_futures=gw.config.sample_use_retrieve_futures,
    )


@post("/api/v1/client/dynamic_config", status_code=200, tags=["session"])
async def client_dynamic_config(data: JSONBody[ClientConfigRequest]) -> dict[str, Any]:
    # sample_cancel_enabled: an abandoned sample future is cancelled (/api/v1/cancel_future), so its sampler skips
    # it if it has not started it yet.
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": True, "sample_cancel_max_batch_size": 64}


@post("/api/v1/create_session", status_code=200, tags=["session"])
async def create_session(data: JSONBody[CreateSessionRequest], gw: GatewayDep,
                         tenant: TenantDep) -> CreateSessionResponse:
    session = Session(session_id=f"sess-{uuid.uuid4().hex[:16]}", tenant=tenant, tags=list(data.tags),
                      user_metadata=dict(data.user_metadata or {}), project_id=data.project_id,
                      display_name=data.display_name)
    await asyncio.to_thread(gw.registry.put_session, session)
    gw.remember_session(session)
    return CreateSessionResponse(session_id=session.session_id)


@post("/api/v1/session_heartbeat", status_code=200, tags=["session"])
async def session_heartbeat(data: JSONBody[SessionHeartbeatRequest], gw: GatewayDep,
                            tenant: TenantDep) -> SessionHeartbeatResponse:
    def beat(session: Session) -> None:
        if not session.finished:
            session.last_heartbeat = time.time()

    if (await gw.update_session(data.session_id, tenant, beat)).finished:
        raise ClientException(status_code=410, detail=f"session {data.session_id!r} is finished")
    return SessionHeartbeatResponse()


@post("/api/v1/sessions/{session_id:str}/finish", status_code=200, tags=["session"])
async def finish_session(session_id: PathId, data: JSONBody[FinishSessionRequest], gw: GatewayDep,
                         tenant: TenantDep) -> dict[str, str]:
    def finish(session: Session) -> None:
        if not session.finished:  # the first finish reason wins
            session.finished = True
            session.user_metadata = {**session.user_metadata,
                                     "finish_reason": data.reason.type if data.reason else "success"}

    await gw.update_session(session_id, tenant, finish)
    return {"session_id": session_id, "status": "finished"}


@post("/api/v1/telemetry", status_code=200, tags=["session"])
async def telemetry(data: JSONBody[TelemetryRequest]) -> StatusResponse:
    log.debug("telemetry: %d events from session %s", len(data.events), data.session_id)
    return StatusResponse(status="accepted")


@get(["/api/v1/get_server_capabilities", "/get_server_capabilities"], tags=["session"])
async def get_server_capabilities(gw: GatewayDep) -> ServerCapabilities:
    models = []
    for name in gw.settings.base_models:
        try:
            context = (await gw.base_models.info(name)).max_positions
        except Exception as exc:  # listed but not resolvable here: still advertise what is configured
            log.warning("base model %s: %s", name, exc)
            context = None
        models.append(SupportedModel(model_name=name, max_context_length=context))
    return ServerCapabilities(supported_models=models)


async def health_report(gw: Gateway) -> dict[str, Any]:
    s3_ok = await asyncio.to_thread(gw.objects.ping)
    workers = await asyncio.to_thread(read_health, gw.objects) if s3_ok else []
    components: dict[str, Any] = {
        # Not ready while the bus listener catches up: it could not yet answer every future any gateway promised.
        "gateway": {"healthy": gw.listener.running and gw.listener.caught_up, "caught_up": gw.listener.caught_up,
                    "futures": len(gw.futures),
                    "pending_samples": gw.futures.local_pending_samples,
                    # records the listener read since start (few after a restart: listener_marks.py), and those
                    # it dropped for a missing or wrong signature, per topic (docs/events.md "Event identity")
                    "records_read": gw.listener.records_seen, "unverified": dict(gw.listener.unverified),
                    # results trainers handed over through the reply door (bus_runtime/doors.py)
                    "reply_door": gw.door.door.address if gw.door and gw.door.door else None,
                    "door_results": gw.listener.direct_results,
                    # training-topic partitions whose trainer's intake door this gateway knows (intake_doors.py)
                    "intake_doors": len(gw.intake.doors),
                    # requests handed to them: sent ahead of the broker's ack, whole, or not (door shut, queue full)
                    "intake_handed": {"announced": gw.intake.bell.announced, "rung": gw.intake.bell.rung,
                                      "skipped": gw.intake.bell.skipped}},
        "s3": {"healthy": s3_ok, "endpoint": gw.settings.s3_endpoint},
        "kafka": {"healthy": gw.producer is not None and gw.listener.running,
                  "bootstrap": gw.settings.kafka_bootstrap},
    }
    for role in ("trainer", "sampler"):
        alive = [w for w in workers if w.role == role and w.alive]
        # A live worker may still report itself sick (its timers failing): then the stack is not healthy.
        components[role] = {"healthy": bool(alive) and all(w.detail.get("healthy", True) for w in alive),
                            "instances": len(alive),
                            "detail": [dataclasses.asdict(w)["detail"] for w in alive]}
    healthy = all(c["healthy"] for c in components.values())
    report: dict[str, Any] = {"status": "ok" if healthy else "degraded", "components": components}
    # Parts `tinker-bus up` restarted after they died (tinker_bus/launcher.py): healthy again, but worth knowing.
    restarts = [w.detail.get("restarts", {}) for w in workers if w.role == "supervisor" and w.alive]
    if restarts:
        report["restarts"] = {part: count for found in restarts for part, count in found.items()}
    return report


@get(["/api/v1/healthz", "/healthz"], tags=["session"], summary="Liveness of the gateway, S3, Kafka and workers")
async def healthz(gw: GatewayDep) -> dict[str, Any]:
    return await health_report(gw)


ROUTES = [client_config, client_dynamic_config, create_session, session_heartbeat, finish_session, telemetry,
          get_server_capabilities, healthz]
