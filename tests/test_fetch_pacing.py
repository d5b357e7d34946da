"""Fetch pacing (bus_runtime/fetch_pacing.py): short fetch waits only while a record is expected soon; the gateway's
count of its own requests awaiting results that drives its listener's pace; and the knob on a real aiokafka consumer
against the real broker."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bus_events import EventType
from bus_events import payloads as p
from bus_gateway.bus_listener import BusListener
from bus_gateway.futures import Future, FutureTable, new_request_id
from bus_runtime.fetch_pacing import FetchPacer, set_fetch_wait
from bus_runtime.kafka_io import make_consumer
from bus_runtime.settings import open_object_store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_lasts_hold_s_after_the_last_busy_or_until_idle():
    clock = Clock()
    pacer = FetchPacer(idle_ms=20, busy_ms=2, hold_s=1.0, clock=clock)
    assert pacer.wait_ms() == 20
    pacer.busy()
    clock.now += 0.9
    assert pacer.wait_ms() == 2
    pacer.busy()  # extends the hold
    clock.now += 0.9
    assert pacer.wait_ms() == 2
    clock.now += 0.2
    assert pacer.wait_ms() == 20
    pacer.busy()
    pacer.idle()
    assert pacer.wait_ms() == 20


def test_a_busy_wait_longer_than_the_idle_one_is_never_used():
    assert FetchPacer(idle_ms=5, busy_ms=50, hold_s=1.0).busy_ms == 5


def test_negative_waits_are_refused_by_name():
    with pytest.raises(ValueError, match="hold_s"):
        FetchPacer(idle_ms=5, busy_ms=1, hold_s=-1)


def _local(table: FutureTable, kind: EventType = EventType.FORWARD_BACKWARD) -> Future:
    return table.add(Future(new_request_id(), "alice", kind.value, "m", local=True))


def _result(fut: Future) -> p.Result:
    return p.Result(request_type=fut.request_type, result={})


def test_the_table_counts_local_requests_until_their_results_arrive():
    table = FutureTable(ttl_s=60)
    started: list[str] = []
    table.on_local_pending.append(lambda fut: started.append(fut.request_id))
    fb, sample = _local(table), _local(table, EventType.SAMPLE)
    remote = table.add(Future(new_request_id(), "alice", "optim_step", "m"))  # another gateway's request
    assert (table.local_pending, table.local_pending_samples) == (2, 1)
    assert started == [fb.request_id, sample.request_id]
    table.resolve(fb.request_id, _result(fb), tenant="alice", model_id="m", seq_id=None)
    table.resolve(fb.request_id, _result(fb), tenant="alice", model_id="m", seq_id=None)  # redelivered: once
    table.discard(sample)
    assert (table.local_pending, table.local_pending_samples) == (0, 0)
    # The listener saw the request first, then the SDK's POST landed here (a retry): it waits here from now on.
    table.add(Future(remote.request_id, "alice", "optim_step", "m", local=True))
    assert table.local_pending == 1 and started[-1] == remote.request_id
    table.resolve(remote.request_id, _result(remote), tenant="alice", model_id="m", seq_id=None)
    assert table.local_pending == 0


async def test_the_listener_fetches_fast_while_its_requests_await_results(settings):
    table = FutureTable(ttl_s=60)
    listener = BusListener(replace(settings, fetch_busy_wait_ms=1), table, open_object_store(settings))
    await listener.start()
    try:
        fetcher = listener.consumer._fetcher  # type: ignore[union-attr]
        assert fetcher._fetch_max_wait_ms == settings.fetch_max_wait_ms
        fut = _local(table)
        assert fetcher._fetch_max_wait_ms == 1
        table.resolve(fut.request_id, _result(fut), tenant="alice", model_id="m", seq_id=None)
        assert fetcher._fetch_max_wait_ms == settings.fetch_max_wait_ms
    finally:
        await listener.stop()


async def test_the_wait_is_set_only_on_a_started_consumer(settings):
    consumer = make_consumer(settings, settings.topics.replies, group_id=None)
    assert not set_fetch_wait(consumer, 1)
    await consumer.start()
    try:
        assert set_fetch_wait(consumer, 1)
        assert consumer._fetcher._fetch_max_wait_ms == 1  # what the next FetchRequest carries (aiokafka 0.14)
    finally:
        await consumer.stop()
