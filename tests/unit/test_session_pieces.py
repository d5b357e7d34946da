"""The pieces behind retrieve_futures (CompletionLog cursors) and the session trace (chrome_trace lanes and
slices), without a broker: the SDK tests drive them end to end."""

from __future__ import annotations

import asyncio

from bus_events import EventType, make_event, make_result
from bus_events import payloads as p
from bus_gateway.completions import CLONE_SEQ_SPAN, CompletionLog
from bus_gateway.futures import Future, FutureTable
from bus_gateway.session_trace import TracedRequest, chrome_trace


def sample_future(table: FutureTable, request_id: str, seq_id: int, session: str = "s:sample:0") -> Future:
    return table.add(Future(request_id, "alice", EventType.SAMPLE.value, session, seq_id))


def test_completions_are_queued_per_session_and_clone_and_trimmed_by_the_cursor():
    async def scenario() -> None:
        table, log = FutureTable(ttl_s=60), CompletionLog(ttl_s=60)
        table.on_resolve.append(log.record)
        key = ("alice", "s:sample:0", 0)
        for n, failed in ((1, False), (2, True)):
            sample_future(table, f"req-{n}", n)
            table.resolve(f"req-{n}", p.Result(request_type="sample", result={} if not failed else None,
                                               error=p.ErrorInfo(message="bad prompt") if failed else None),
                          tenant="alice", model_id="s:sample:0", seq_id=n)
        sample_future(table, "req-clone", CLONE_SEQ_SPAN + 1)  # a cloned SamplingClient's request
        table.resolve("req-clone", p.Result(request_type="sample", result={}), tenant="alice",
                      model_id="s:sample:0", seq_id=CLONE_SEQ_SPAN + 1)

        found, cursor = await log.poll(key, 0, timeout_s=0)
        assert [(c.request_id, c.failed) for c in found] == [("req-1", False), ("req-2", True)] and cursor == 2
        assert (await log.poll(key, 1, timeout_s=0))[0][0].request_id == "req-2"  # req-1 acknowledged
        assert [c.request_id for c in (await log.poll(("alice", "s:sample:0", 1), 0, 0))[0]] == ["req-clone"]
        assert await log.poll(("bob", "s:sample:0", 0), 0, timeout_s=0) == ([], 0)  # other tenants see nothing

        waiting = asyncio.create_task(log.poll(key, 2, timeout_s=30))  # long-poll: woken by the next completion
        await asyncio.sleep(0.05)
        assert not waiting.done()
        sample_future(table, "req-3", 3)
        table.resolve("req-3", p.Result(request_type="sample", result={}), tenant="alice", model_id="s:sample:0",
                      seq_id=3)
        found, cursor = await asyncio.wait_for(waiting, 5)
        assert [c.request_id for c in found] == ["req-3"] and cursor == 3
        log.sweep(now=10**12)  # long after the TTL: nothing is kept for nobody
        assert await log.poll(key, 0, timeout_s=0) == ([], 0)

    asyncio.run(scenario())


def request(kind: EventType, payload: object, at: float, started: float | None, done: float | None,
            error: str | None = None) -> TracedRequest:
    env, _ = make_event(kind, payload, model_id="s:train:0", seq_id=1)  # type: ignore[arg-type]
    env.created_at = at
    found = TracedRequest(env)
    if done is not None:
        reply_env, result = make_result(env, {} if error is None else None,
                                        p.ErrorInfo(message=error) if error else None, started_at=started)
        reply_env.created_at = done
        found.reply, found.result = reply_env, result
    return found


def test_trace_slices_and_lanes():
    requests = [
        request(EventType.GET_INFO, p.GetInfo(), at=10.0, started=11.0, done=13.0),
        request(EventType.GET_INFO, p.GetInfo(), at=12.0, started=13.5, done=14.0),  # overlaps the first
        request(EventType.OPTIM_STEP, p.OptimStep(), at=20.0, started=None, done=20.5, error="refused"),
        request(EventType.GET_INFO, p.GetInfo(), at=30.0, started=None, done=None),
    ]
    trace = chrome_trace("s", requests)
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    first = [e for e in slices if e["args"]["request_id"] == requests[0].env.request_id]
    assert [(e["cat"], e["ts"], e["dur"], e["tid"]) for e in first] == [
        ("queue", 10_000_000, 1_000_000, 0), ("compute", 11_000_000, 2_000_000, 0)]
    second = [e for e in slices if e["args"]["request_id"] == requests[1].env.request_id]
    assert {e["tid"] for e in second} == {1}  # concurrent: its own thread, so slices never overlap on one
    [refused] = [e for e in slices if e["args"]["request_id"] == requests[2].env.request_id]
    assert refused["cat"] == "queue" and refused["dur"] == 500_000 and refused["args"]["error"] == "refused"
    assert refused["tid"] == 0  # the first thread is free again by then
    [pending] = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert pending["ts"] == 30_000_000 and "no result" in pending["name"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"s:train:0", "s:train:0 #0", "s:train:0 #1"}
