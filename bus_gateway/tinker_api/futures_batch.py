"""POST /api/v1/retrieve_futures (a sampling session's completions, for the SDK's poller) and
POST /api/v1/cancel_future (skip a queued sample) (tinker-protocol.md 2.3, 2.4)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import post
from litestar.params import JSONBody

from bus_events import EventType
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.tinker_api.schemas import Body, Id, NonNegative, Reply

RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class SamplingSessionTarget(Body):
    sampling_session_id: Id
    cloned_sampler_id: NonNegative = 0
    type: Literal["sampling_session"] = "sampling_session"


class FuturesRetrieveRequest(Body):
    target: SamplingSessionTarget
    prev_cursor: NonNegative = 0
    timeout: Annotated[float, msgspec.Meta(ge=0)] | None = None
    # Results are kept for the result TTL all the same: nothing to free early.
    retrieved_request_ids: list[RequestId] = msgspec.field(default_factory=list)


class FutureCompletion(Reply):
    request_id: str
    state: Literal["finished", "failed"]


class FuturesRetrieveResponse(msgspec.Struct):
    completions: list[FutureCompletion]
    cursor: int


class CancelFutureRequest(Body):
    request_id: RequestId


class CancelFutureResponse(msgspec.Struct):
    request_id: str
    status: Literal["done", "cancel_requested"]


@post("/api/v1/retrieve_futures", status_code=200, tags=["futures"],
      summary="Long-poll the finished and failed sample requests of one sampling session (clone)")
async def retrieve_futures(data: JSONBody[FuturesRetrieveRequest], gw: GatewayDep,
                           tenant: TenantDep) -> FuturesRetrieveResponse:
    target = data.target
    await gw.sampling_session(target.sampling_session_id, tenant)  # 404 unless the caller's
    timeout = gw.config.long_poll_s if data.timeout is None else min(data.timeout, gw.config.long_poll_s)
    found, cursor = await gw.completions.poll((tenant, target.sampling_session_id, target.cloned_sampler_id),
                                              data.prev_cursor, timeout)
    return FuturesRetrieveResponse(
        completions=[FutureCompletion(request_id=c.request_id, state="failed" if c.failed else "finished")
                     for c in found],
        cursor=cursor)


@post("/api/v1/cancel_future", status_code=200, tags=["futures"],
      summary="Cancel a sample request: skipped if its sampler has not started it, else answered as usual")
async def cancel_future(data: JSONBody[CancelFutureRequest], gw: GatewayDep, tenant: TenantDep) -> CancelFutureResponse:
    fut = await gw.future(data.request_id, tenant)  # 404 / 410 like retrieve_future
    if fut.done.is_set():  # computed already: its result stands
        return CancelFutureResponse(request_id=fut.request_id, status="done")
    if fut.request_type != EventType.SAMPLE:
        raise FieldError("request_id", f"{data.request_id} is a {fut.request_type} request: only sample requests "
                                       "can be cancelled (training requests are applied in seq_id order, and the "
                                       "event log replays them)")
    await gw.cancel(fut)
    return CancelFutureResponse(request_id=fut.request_id, status="cancel_requested")


ROUTES = [retrieve_futures, cancel_future]
