"""Reading sessions (RestClient 0.38): list, get, search, assign a project.

A tenant sees its own sessions only: "accessible" scopes and owners mean the same as "own" here, because tenants
share nothing. Projects are free labels of a session (no project ACLs). Sessions are JSON documents in the bucket
(artifact_store.Registry); a search reads the tenant's sessions and filters them here.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from litestar import get, post, put
from litestar.params import JSONBody, QueryParameter

from artifact_store import Session
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.checkpoints import PageLimit, PageOffset
from bus_gateway.tinker_api.session_schemas import (
    Active,
    ActiveQuery,
    AssignProjectRequest,
    ClientFinished,
    ClientFinishedQuery,
    FinishReason,
    GetSessionResponse,
    ListSessionsResponse,
    SearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionSummary,
    StatusQuery,
    UserOwner,
)
from bus_gateway.tokens import user_urn

# "accessible" means the same as "owned": tenants share nothing.
AccessScope = Annotated[Literal["owned", "accessible"], QueryParameter()]
# A session that heartbeated this recently is "active" (the SDK heartbeats every 10 s or so).
ACTIVE_WINDOW_S = 120.0


def _text_map(values: dict[str, Any]) -> dict[str, str]:
    return {str(key): str(value) for key, value in values.items()}


def _created(session: Session) -> datetime:
    return datetime.fromtimestamp(session.created_at, UTC)


def _status(session: Session, now: float) -> ClientFinished | Active | None:
    if session.finished:
        reason = session.user_metadata.get("finish_reason", "success")
        return ClientFinished(reason=FinishReason(type=reason if reason in ("errored", "interrupted") else "success"))
    return Active() if session.last_heartbeat + ACTIVE_WINDOW_S >= now else None


def _status_matches(status: ClientFinished | Active | None, queries: list[StatusQuery] | None) -> bool:
    if queries is None:
        return True
    for query in queries:
        if isinstance(query, ClientFinishedQuery) and isinstance(status, ClientFinished):
            if query.reasons is None or status.reason.type in query.reasons:
                return True
        elif isinstance(status, Active) and isinstance(query, ActiveQuery):
            return True
    return False  # nothing here is ever cancelled or failed as a whole


def _matches(session: Session, query: SessionSearchRequest, tenant: str, now: float) -> bool:
    if isinstance(query.owner, UserOwner) and user_urn(tenant) not in query.owner.owner_urns:
        return False
    if query.session_id is not None or query.display_name is not None:  # either one matching is enough
        by_id = query.session_id is not None and session.session_id == query.session_id
        name = (session.display_name or "").lower()
        by_name = query.display_name is not None and all(word in name for word in query.display_name.lower().split())
        if not (by_id or by_name):
            return False
    if query.project_ids is not None and session.project_id not in query.project_ids:
        return False
    metadata = _text_map(session.user_metadata)
    if any(metadata.get(key) != value for key, value in query.user_metadata.items()):
        return False
    return _status_matches(_status(session, now), query.statuses)


def _summary(gw: Gateway, session: Session, tenant: str, now: float) -> SessionSummary:
    """Blocking (S3): the session with its checkpoints counted."""
    checkpoints = [info for run_id in gw.registry.run_ids(session.session_id)
                   for info in gw.checkpoints.list_run(run_id)]
    return SessionSummary(session_id=session.session_id, created_at=_created(session), owner=user_urn(tenant),
                          project_id=session.project_id or "", status=_status(session, now),
                          checkpoints_count=len(checkpoints),
                          checkpoint_storage_bytes=sum(info.size_bytes for info in checkpoints),
                          display_name=session.display_name, user_metadata=_text_map(session.user_metadata))


@get("/api/v1/sessions", tags=["session"], summary="The caller's session ids, newest first")
async def list_sessions(gw: GatewayDep, tenant: TenantDep, limit: PageLimit = 20, offset: PageOffset = 0,
                        access_scope: AccessScope = "owned") -> ListSessionsResponse:
    sessions = await asyncio.to_thread(gw.registry.list_sessions, tenant)
    newest_first = [s.session_id for s in reversed(sessions)]
    return ListSessionsResponse(sessions=newest_first[offset:offset + limit])


@get("/api/v1/sessions/{session_id:str}", tags=["session"], summary="A session's training runs and samplers")
async def get_session(session_id: PathId, gw: GatewayDep, tenant: TenantDep,
                      access_scope: AccessScope = "owned") -> GetSessionResponse:
    session = await gw.session(session_id, tenant)
    runs, samplers = await asyncio.gather(asyncio.to_thread(gw.registry.run_ids, session_id),
                                          asyncio.to_thread(gw.registry.sampling_session_ids, session_id))
    return GetSessionResponse(training_run_ids=runs, sampler_ids=samplers,
                              user_metadata=_text_map(session.user_metadata), display_name=session.display_name)


@put("/api/v1/sessions/{session_id:str}/project", status_code=200, tags=["session"],
     summary="Move a session (and its runs and samplers) into a project")
async def assign_session_project(session_id: PathId, data: JSONBody[AssignProjectRequest], gw: GatewayDep,
                                 tenant: TenantDep) -> dict[str, str]:
    def assign(session: Session) -> None:
        session.project_id = data.project_id

    await gw.update_session(session_id, tenant, assign)
    return {"session_id": session_id, "project_id": data.project_id}


@post("/api/v1/sessions/search", status_code=200, tags=["session"],
      summary="Search the caller's sessions, newest first, a page at a time")
async def search_sessions(data: JSONBody[SessionSearchRequest], gw: GatewayDep,
                          tenant: TenantDep) -> SessionSearchResponse:
    now = time.time()
    sessions = await asyncio.to_thread(gw.registry.list_sessions, tenant)
    ordered = sorted(sessions, key=lambda s: (_created(s), s.session_id), reverse=True)
    if data.cursor is not None:
        after = (data.cursor.last_created_at, data.cursor.last_session_id)
        ordered = [s for s in ordered if (_created(s), s.session_id) < after]
    hits = [s for s in ordered if _matches(s, data, tenant, now)]
    page = hits[:data.limit]
    summaries = await asyncio.to_thread(lambda: [_summary(gw, s, tenant, now) for s in page])
    more = len(hits) > data.limit
    cursor = SearchCursor(last_created_at=_created(page[-1]), last_session_id=page[-1].session_id) if more else None
    return SessionSearchResponse(sessions=summaries, next_cursor=cursor)


ROUTES = [list_sessions, get_session, assign_session_project, search_sessions]
