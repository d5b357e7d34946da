"""POST /api/v1/retrieve_future: long-poll a request's result (tinker-protocol.md 2.4)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from litestar import Request, Response, post
from litestar.exceptions import ClientException
from litestar.params import JSONBody

from bus_events import EventType
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import NotFound
from bus_gateway.futures import Future, request_id_time
from bus_gateway.results import PROTO_MEDIA_TYPE, MalformedResult, failure, json_body, proto_body
from bus_gateway.state import Gateway
from bus_gateway.tinker_api.schemas import RequestFailed, RetrieveFutureRequest, TryAgain

PROTO_RESULT_TYPES = (EventType.FORWARD_BACKWARD, EventType.SAMPLE)


async def find_future(gw: Gateway, request_id: str, tenant: str) -> Future:
    """The caller's future; 410 if its id is older than the result TTL, 404 if nobody ever issued it."""
    fut = gw.futures.get(request_id)
    if fut is None:
        issued_at = request_id_time(request_id)
        ttl = gw.settings.result_ttl_s
        if issued_at is not None and issued_at < time.time() - ttl:
            raise ClientException(status_code=410,
                                  detail=f"request {request_id!r} expired: results are kept for {ttl:g} s")
        if issued_at is not None:  # well-formed: another gateway may have issued it a moment ago
            fut = await gw.futures.wait_for_id(request_id, gw.config.unknown_request_grace_s)
    if fut is None or fut.tenant != tenant:
        raise NotFound(f"unknown request_id {request_id!r}")
    return fut


async def wait_done(fut: Future, timeout_s: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fut.done.wait(), timeout_s)
    return fut.done.is_set()


def render_result(fut: Future, accept_proto: bool) -> Response:
    try:
        failed = failure(fut)
        if failed is not None:
            return Response(failed)
        if accept_proto and fut.request_type in PROTO_RESULT_TYPES:
            return Response(proto_body(fut), media_type=PROTO_MEDIA_TYPE)
        return Response(json_body(fut))
    except MalformedResult as exc:
        return Response(RequestFailed(error=str(exc), category="server"))


@post("/api/v1/retrieve_future", status_code=200, tags=["futures"],
      summary="Long-poll a promise: the result, {type: try_again}, or {error, category}")
async def retrieve_future(data: JSONBody[RetrieveFutureRequest], request: Request, gw: GatewayDep,
                          tenant: TenantDep) -> Response:
    fut = await find_future(gw, data.request_id, tenant)
    if not await wait_done(fut, gw.config.long_poll_s):
        return Response(TryAgain(request_id=fut.request_id))
    return render_result(fut, PROTO_MEDIA_TYPE in request.headers.get("accept", ""))


ROUTES = [retrieve_future]
