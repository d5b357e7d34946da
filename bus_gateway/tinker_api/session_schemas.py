"""Bodies of the session REST routes (SDK 0.38 types get_session_response, list_sessions_response,
session_search_*, session_summary, session_status*): what session_queries.py and session_traces.py answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from bus_gateway.tinker_api.schemas import Body, Reply

FinishReasonType = Literal["success", "errored", "interrupted"]


class GetSessionResponse(Reply):
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


class ListSessionsResponse(msgspec.Struct):
    sessions: list[str]


class AssignProjectRequest(Body):
    project_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# ------------------------------------------------------------------ search
class OwnOwner(Body, tag="own", tag_field="type"):
    pass


class AccessibleOwner(Body, tag="accessible", tag_field="type"):
    pass


class UserOwner(Body, tag="user", tag_field="type"):
    owner_urns: Annotated[list[str], msgspec.Meta(min_length=1, max_length=10)]


class ActiveQuery(Body, tag="active", tag_field="type"):
    pass


class CancelledQuery(Body, tag="cancelled", tag_field="type"):
    pass


class FailedQuery(Body, tag="failed", tag_field="type"):
    pass


class ClientFinishedQuery(Body, tag="client_finished", tag_field="type"):
    reasons: Annotated[list[FinishReasonType], msgspec.Meta(min_length=1)] | None = None


StatusQuery = ActiveQuery | CancelledQuery | FailedQuery | ClientFinishedQuery


class SearchCursor(msgspec.Struct):
    last_created_at: datetime
    last_session_id: str


class SessionSearchRequest(Body):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = msgspec.field(default_factory=dict)
    display_name: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    owner: OwnOwner | AccessibleOwner | UserOwner = msgspec.field(default_factory=OwnOwner)
    statuses: Annotated[list[StatusQuery], msgspec.Meta(min_length=1)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=200)] = 50
    cursor: SearchCursor | None = None


class FinishReason(msgspec.Struct):
    type: FinishReasonType


class ClientFinished(msgspec.Struct, tag="client_finished", tag_field="type"):
    reason: FinishReason


class Active(msgspec.Struct, tag="active", tag_field="type"):
    pass


class SessionSummary(Reply):
    session_id: str
    created_at: datetime
    owner: str
    project_id: str
    checkpoints_count: int
    status: ClientFinished | Active | None = None  # None: neither finished nor heartbeating lately
    display_name: str | None = None
    user_metadata: dict[str, str] | None = None
    checkpoint_storage_bytes: int | None = None


class SessionSearchResponse(Reply):
    sessions: list[SessionSummary]
    next_cursor: SearchCursor | None = None


class TraceExportResponse(Reply):
    status: Literal["pending", "ready", "failed"]
    url: str | None = None
    error: str | None = None
