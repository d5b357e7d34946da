"""A session's requests as a Chrome-trace JSON (loads in https://ui.perfetto.dev and chrome://tracing), built from
the event log: every request event of the session's models and sampling sessions, and its `result`.

Per request, on the lane of its model or sampling session (a Perfetto process; concurrent requests get their own
threads so that slices never overlap on one thread):
  - a `queue` slice: from the request's envelope `created_at` (the gateway published it) to the result's
    `started_at` (the worker started computing it);
  - a `compute` slice: from `started_at` to the result's envelope `created_at` (the worker replied).
A result without `started_at` (refused, cancelled, or written before workers recorded it) gives one `queue`
slice up to the reply; a request without a result yet gives an instant event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bus_events import BlobStore, Envelope, EventType
from bus_events import payloads as p
from bus_gateway.bus_listener import REQUEST_EVENTS
from bus_runtime.log_reader import read_bus
from bus_runtime.records import Decoded, decode_record
from bus_runtime.settings import BusSettings

US = 1_000_000  # trace timestamps are microseconds


@dataclass
class TracedRequest:
    env: Envelope
    reply: Envelope | None = None
    result: p.Result | None = None

    @property
    def end(self) -> float:
        return self.reply.created_at if self.reply is not None else self.env.created_at


async def session_requests(settings: BusSettings, blobs: BlobStore, session_id: str,
                           tenant: str) -> list[TracedRequest]:
    """The session's requests with their results, in the order they were published."""
    prefix = f"{session_id}:".encode()  # `<session>:train:<n>` and `<session>:sample:<n>` keys
    topics = settings.topics
    requests: dict[str, TracedRequest] = {}
    replies: dict[str, tuple[Envelope, p.Result]] = {}
    async for record in read_bus(settings, [topics.train, topics.sample, topics.replies],
                                 lambda key: key is not None and key.startswith(prefix)):
        decoded = await decode_record(record.value, blobs, {*REQUEST_EVENTS, EventType.RESULT},
                                      envelope_only=REQUEST_EVENTS)
        if not isinstance(decoded, Decoded) or decoded.env.tenant != tenant:
            continue  # poison, seq_voids and cancels, or somebody else's event under a key like ours
        env = decoded.env
        if isinstance(decoded.payload, p.Result):
            replies.setdefault(env.request_id, (env, decoded.payload))  # a re-published result: the first counts
        else:
            requests.setdefault(env.request_id, TracedRequest(env))
    for request_id, (env, result) in replies.items():
        if request_id in requests:
            requests[request_id].reply, requests[request_id].result = env, result
    return sorted(requests.values(), key=lambda r: r.env.created_at)


def _slice(name: str, category: str, start: float, end: float, pid: int, tid: int,
           args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "cat": category, "ph": "X", "ts": round(start * US), "dur": max(0, round((end - start) * US)),
            "pid": pid, "tid": tid, "args": args}


def _metadata(kind: str, name: str, pid: int, tid: int = 0) -> dict[str, Any]:
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def chrome_trace(session_id: str, requests: list[TracedRequest]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    pids: dict[str, int] = {}
    lanes: dict[str, list[float]] = {}  # model -> end time of the last request on each of its threads
    for request in requests:
        env = request.env
        if env.model_id not in pids:
            pids[env.model_id] = len(pids) + 1
            lanes[env.model_id] = []
            events.append(_metadata("process_name", env.model_id, pids[env.model_id]))
        pid, ends = pids[env.model_id], lanes[env.model_id]
        tid = next((i for i, end in enumerate(ends) if end <= env.created_at), len(ends))
        if tid == len(ends):
            ends.append(0.0)
            events.append(_metadata("thread_name", f"{env.model_id} #{tid}", pid, tid))
        ends[tid] = max(request.end, env.created_at)
        args: dict[str, Any] = {"request_id": env.request_id, "seq_id": env.seq_id}
        name = env.type.value
        if request.reply is None or request.result is None:
            events.append({"name": f"{name} (no result yet)", "cat": "pending", "ph": "i", "s": "t",
                           "ts": round(env.created_at * US), "pid": pid, "tid": tid, "args": args})
            continue
        if request.result.error is not None:
            args["error"] = request.result.error.message
        started = request.result.started_at
        if started is None:
            events.append(_slice(f"{name} queue", "queue", env.created_at, request.reply.created_at, pid, tid, args))
            continue
        started = min(max(started, env.created_at), request.reply.created_at)  # clocks of different hosts
        events.append(_slice(f"{name} queue", "queue", env.created_at, started, pid, tid, args))
        events.append(_slice(name, "compute", started, request.reply.created_at, pid, tid, args))
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "metadata": {"session_id": session_id, "requests": len(requests), "source": "tinker-bus event log"}}


async def build_trace(settings: BusSettings, blobs: BlobStore, session_id: str, tenant: str) -> bytes:
    requests = await session_requests(settings, blobs, session_id, tenant)
    return json.dumps(chrome_trace(session_id, requests)).encode()
