"""POST /api/v1/retrieve_future: long-poll a request's result (tinker-protocol.md 2.4)."""

from __future__ import annotations

import msgspec
from litestar import Request, Response, post
from litestar.params import JSONBody

from bus_events import EventType
from bus_gateway import observability
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import NotYetKnown
from bus_gateway.futures import Future
from bus_gateway.results import PROTO_MEDIA_TYPE, MalformedResult, failure, json_body, proto_body
from bus_gateway.tinker_api import custom_losses
from bus_gateway.tinker_api.schemas import RequestFailed, RetrieveFutureRequest, TryAgain, UntypedFuture

PROTO_RESULT_TYPES = (EventType.FORWARD_BACKWARD, EventType.SAMPLE)


def promise(fut: Future, sample_sequence_ids: list[str] | None = None, model_id: str | None = None) -> UntypedFuture:
    """The answer to every Tinker POST: the request id to poll (model_id: as the caller named the model)."""
    return UntypedFuture(request_id=fut.request_id, model_id=model_id or fut.model_id,
                         sample_sequence_ids=sample_sequence_ids)


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
    if (settled := await custom_losses.settled_future(gw, data.request_id, tenant)) is not None:
        return Response(settled)
    try:
        fut = await gw.future(data.request_id, tenant)
    except NotYetKnown:  # this gateway (just restarted) is still reading the bus: never a final 404
        return Response(TryAgain(request_id=data.request_id))
    if not await fut.wait(gw.config.long_poll_s):
        queue = await observability.queue_state(request.app.state, fut.request_type)
        reason = queue.queue_state_reason if queue.queue_state_reason is not None else msgspec.UNSET
        return Response(TryAgain(request_id=fut.request_id, queue_state=queue.queue_state,  # type: ignore[arg-type]
                                 queue_state_reason=reason))
    return render_result(fut, PROTO_MEDIA_TYPE in request.headers.get("accept", ""))


ROUTES = [retrieve_future]
