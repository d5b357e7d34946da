"""GET /api/v1/sessions/{id}/trace_export (RestClient.export_session_trace, `tinker session export-trace`) and the
signed download link it answers with.

The first poll starts building the trace from the event log (session_trace.py) and waits up to BUILD_WAIT_S for
it; the SDK polls again every 5 s while the answer is `pending`. A finished build is handed out once: the next
export builds afresh, so it includes what happened since. The trace is stored in the bucket at
`traces/<session_id>.json`; the link needs no API key (the SDK downloads it with a plain GET) and is signed
with the gateway's secret (tokens.py), valid for LINK_TTL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Annotated

from litestar import Request, Response, get
from litestar.exceptions import NotAuthorizedException
from litestar.params import QueryParameter

from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.session_trace import build_trace
from bus_gateway.tinker_api.session_schemas import TraceExportResponse

log = logging.getLogger(__name__)

BUILD_WAIT_S = 20.0  # well under the SDK's read timeout
LINK_TTL_S = 3600
DOWNLOAD_PATH = "/api/v1/session_traces"
PUBLIC_PATHS = [f"^{DOWNLOAD_PATH}/"]  # the signature is the credential


def trace_key(session_id: str) -> str:
    return f"traces/{session_id}.json"


def _link_text(session_id: str, expires: int) -> str:
    return f"session-trace\0{session_id}\0{expires}"


async def _build_and_store(gw: Gateway, session_id: str, tenant: str) -> None:
    data = await build_trace(gw.settings, gw.objects, session_id, tenant)
    await asyncio.to_thread(gw.objects.put_bytes, trace_key(session_id), data, "application/json")


@get("/api/v1/sessions/{session_id:str}/trace_export", tags=["session"],
     summary="Export the session's requests (queue and compute time) as a Chrome/Perfetto trace: a signed link")
async def trace_export(session_id: PathId, request: Request, gw: GatewayDep,
                       tenant: TenantDep) -> TraceExportResponse:
    await gw.session(session_id, tenant)  # 404 unless the caller's
    builds: dict[str, asyncio.Task[None]] = request.app.state.trace_builds
    task = builds.get(session_id)
    if task is None:
        task = builds[session_id] = asyncio.create_task(_build_and_store(gw, session_id, tenant),
                                                        name=f"trace-{session_id}")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), BUILD_WAIT_S)
    if not task.done():
        return TraceExportResponse(status="pending")
    builds.pop(session_id, None)
    if task.exception() is not None:
        log.error("trace export of %s failed", session_id, exc_info=task.exception())
        return TraceExportResponse(status="failed", error=f"building the trace failed: {task.exception()!r}")
    expires = int(time.time()) + LINK_TTL_S
    signature = gw.tokens.sign(_link_text(session_id, expires))
    url = f"{str(request.base_url).rstrip('/')}{DOWNLOAD_PATH}/{session_id}?expires={expires}&signature={signature}"
    return TraceExportResponse(status="ready", url=url)


@get(f"{DOWNLOAD_PATH}/{{session_id:str}}", tags=["session"], summary="Download an exported trace (signed link)")
async def download_trace(session_id: PathId, gw: GatewayDep, expires: Annotated[int, QueryParameter()],
                         signature: Annotated[str, QueryParameter(max_length=128)]) -> Response:
    if expires < time.time() or not gw.tokens.signed(_link_text(session_id, expires), signature):
        raise NotAuthorizedException("signature: this trace link is invalid or expired; export the trace again")
    data = await asyncio.to_thread(gw.objects.get_bytes_or_none, trace_key(session_id))
    if data is None:
        raise NotFound(f"no trace of session {session_id!r}")
    return Response(data, media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="{session_id}.json"'})


ROUTES = [trace_export, download_trace]
