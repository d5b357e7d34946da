"""The KV page pool and the scheduler without a model: pages shared, freed and reused, the prefix cache,
admission by pages and rows, requests joining a running batch, rejections that answer at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bus_events import payloads as p
from sampler_consumer.kv_pages import SCRATCH_PAGE, OutOfPages, PagePool, page_digests
from sampler_consumer.lora import LoraBank
from sampler_consumer.requests import GenFailure, GenOutput, GenRequest
from sampler_consumer.scheduler import Scheduler
from sampler_consumer.stops import StopChecker

PAGE = 4


def _scheduler(pages: int, rows: int = 8, prefill_tokens: int = 64) -> Scheduler:
    # A real slot table over a one-layer module: base-model requests (adapter None) never touch it.
    bank = LoraBank(nn.Sequential(nn.Linear(4, 4)), torch.device("cpu"), torch.float32, slots=3)
    return Scheduler(PagePool(pages, PAGE), bank.adapters, max_rows=rows, max_pages_per_row=16,
                     max_prefill_tokens=prefill_tokens,
                     stop_rule=lambda r: StopChecker(r.params.stop, frozenset(), lambda t: ""))


def _request(prompt: list[int], max_tokens: int = 3, samples: int = 1) -> GenRequest:
    return GenRequest(prompt, p.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, stop=[]),
                      num_samples=samples)


def _run_step(s: Scheduler, token: int = 7):
    """One step with every sampled token = `token` (what a model would have picked does not matter here)."""
    plan = s.schedule()
    n = len(plan.sample)
    s.complete(plan, np.full(n, token, dtype=np.int64), np.zeros(n, dtype=np.float32), [None] * len(plan.prefills))
    return plan


def test_page_pool_refcounts_free_list_and_idle_cached_pages():
    pool = PagePool(5, PAGE)
    assert pool.available == 4  # page 0 is the scratch page
    pages = [pool.allocate() for _ in range(4)]
    assert SCRATCH_PAGE not in pages and sorted(pages) == [1, 2, 3, 4]
    with pytest.raises(OutOfPages):
        pool.allocate()
    digests = page_digests("adapter", list(range(8)), PAGE, 2)
    pool.publish(pages[:2], digests)
    pool.retain(pages[0])
    pool.release_all(pages)
    assert pool.free_pages == 2 and pool.available == 3  # page 0 is still held; page 1 idle in the cache
    pool.release(pages[0])
    assert pool.available == 4 and pool.cached_pages == 2
    assert pool.match(digests) == pages[:2]  # found again, retained for the caller
    assert pool.match(page_digests("other adapter", list(range(8)), PAGE, 2)) == []
    pool.release_all(pages[:2])
    fresh = [pool.allocate() for _ in range(4)]  # the free pages first, then the idle cached ones (evicted)
    assert sorted(fresh) == [1, 2, 3, 4] and pool.cached_pages == 0 and pool.match(digests) == []


def test_a_group_shares_full_prompt_pages_and_copies_the_partial_one():
    s = _scheduler(pages=40)
    prompt = list(range(10, 20))  # 2 full pages + 2 tokens
    for _ in range(3):
        s.add(_request(prompt), lambda r: None)
    s.add(_request(prompt, samples=2), lambda r: None)
    plan = s.schedule()
    [item] = plan.prefills
    assert len(item.rows) == 5 and item.start == 0
    full = item.pages[:2]
    assert all(row.pages[:2] == full for row in item.rows)
    assert [s.pool.refs[page] for page in full] == [5, 5]
    assert len({row.pages[2] for row in item.rows}) == 5  # each row its own last page...
    assert [src for src, _ in item.tail_copies] == [item.pages[2]] * 4  # ...copied from the prefilled one
    assert len(plan.decode) == 0 and len(plan.sample) == 5


def test_pages_are_freed_when_rows_stop_and_reused_by_the_next_request():
    s = _scheduler(pages=12)
    answers: list = []
    s.add(_request(list(range(1, 7)), max_tokens=5), answers.append)
    first = _run_step(s)
    held = set(first.prefills[0].pages)
    while s.rows:
        _run_step(s)
    [answer] = answers
    assert isinstance(answer, GenOutput) and answer.sequences[0].tokens == [7] * 5
    assert s.pool.available == 11 and s.reserved == 0
    # The prompt's one full page stays cached (idle); the rest went back to the free list and is handed out again.
    s.add(_request(list(range(50, 62)), max_tokens=2), answers.append)
    again = _run_step(s)
    assert held & set(again.prefills[0].pages)


def test_an_identical_prompt_later_reuses_the_cached_prefix():
    s = _scheduler(pages=40)
    prompt = list(range(3, 16))  # 13 tokens: 3 full pages
    s.add(_request(prompt), lambda r: None)
    first = _run_step(s).prefills[0]
    s.add(_request(prompt), lambda r: None)
    second = _run_step(s).prefills[0]
    assert second.start == 3 * PAGE and second.pages[:3] == first.pages[:3] and second.new_tokens == 1
    assert s.pool.hits == 3
    # A prompt whose length is a page multiple recomputes its last page (the last position gives the logits).
    s.add(_request(prompt[:12]), lambda r: None)
    assert _run_step(s).prefills[0].start == 2 * PAGE


def test_requests_join_a_running_batch_at_the_next_step():
    s = _scheduler(pages=40)
    s.add(_request([1, 2, 3], max_tokens=6), lambda r: None)
    _run_step(s)
    _run_step(s)
    s.add(_request([4, 5, 6, 7, 8], max_tokens=2), lambda r: None)
    plan = _run_step(s)
    assert len(plan.decode) == 1 and len(plan.prefills) == 1  # the newcomer's prefill beside the running decode
    assert [row.group.request.prompt for row in plan.sample] == [[1, 2, 3], [4, 5, 6, 7, 8]]


def test_admission_waits_for_pages_and_rows_and_rejects_what_can_never_fit():
    s = _scheduler(pages=7, rows=3)  # 6 usable pages
    answers: list = []
    s.add(_request(list(range(1, 9)), max_tokens=8), answers.append)  # 16 positions: 4 pages
    s.add(_request(list(range(20, 28)), max_tokens=8), answers.append)  # another 4: must wait
    s.add(_request([1], max_tokens=100), answers.append)  # 101 positions: 26 pages, never
    plan = s.schedule()
    assert len(plan.prefills) == 1 and len(s.waiting) == 2
    s.complete(plan, np.full(1, 7), np.zeros(1, dtype=np.float32), [None])
    while len(s.waiting) == 2:
        _run_step(s)
    assert len(s.rows) == 1 and s.rows[next(iter(s.rows))].group.request.prompt[0] == 20
    [done, rejected] = answers  # the first request, then the one that can never fit
    assert isinstance(done, GenOutput)
    assert isinstance(rejected, GenFailure) and rejected.category == "user" and "needs 26 KV pages" in rejected.message
    s2 = _scheduler(pages=40, rows=3)
    answers2: list = []
    s2.add(_request([1], samples=4), answers2.append)
    s2.add(_request(list(range(30)), max_tokens=200), answers2.append)
    s2.add(_request([1, 2], samples=3), answers2.append)
    plan = s2.schedule()
    assert [f.category for f in answers2] == ["user", "user"]
    assert "exceeds the 3 rows" in answers2[0].message and "KV pages" in answers2[1].message
    assert len(plan.prefills[0].rows) == 3


def test_a_step_planned_before_the_last_one_landed_drops_the_token_of_a_row_that_had_stopped():
    """The engine plans step n+1 before step n's tokens are read: a row that stopped at n decodes once more,
    and that token is dropped; its slot and pages are free for the next request; the positions advance as if
    every step had landed first."""
    s = _scheduler(pages=20)
    answers: list = []
    s.add(GenRequest([1, 2, 3], p.SamplingParams(max_tokens=8, temperature=1.0, seed=1, stop=[99])), answers.append)
    first = s.schedule()  # prefill: the first token
    second = s.schedule()  # planned before `first` landed: the row decodes at position 3
    assert list(second.decode_positions) == [3] and list(second.sample_steps) == [1]
    s.complete(first, np.array([5]), np.zeros(1, dtype=np.float32), [None])
    third = s.schedule()
    s.complete(second, np.array([99]), np.zeros(1, dtype=np.float32), [])  # stops here
    assert len(answers) == 1 and answers[0].sequences[0].tokens == [5, 99]
    assert s.rows == {} and s.reserved == 0
    s.add(_request([7, 8, 9, 10, 11]), answers.append)
    fourth = s.schedule()  # the freed slot goes to the newcomer while `third` (the stopped row) is in flight
    assert fourth.prefills[0].rows[0].slot == third.sample[0].slot
    s.complete(third, np.array([42]), np.zeros(1, dtype=np.float32), [])  # the stopped row's speculative token
    assert answers[0].sequences[0].tokens == [5, 99]
    s.complete(fourth, np.array([6]), np.zeros(1, dtype=np.float32), [None])
    while s.rows:
        _run_step(s)
    assert answers[1].sequences[0].tokens == [6, 7, 7]
    assert s.pool.available == 19


def test_a_row_is_never_planned_past_max_tokens_while_its_last_token_is_in_flight():
    s = _scheduler(pages=20)
    s.add(_request([1, 2], max_tokens=2), lambda r: None)
    first, second = s.schedule(), s.schedule()
    assert len(second.decode) == 1
    assert s.schedule().empty  # two tokens launched: nothing more to plan until they land
    s.complete(first, np.array([3]), np.zeros(1, dtype=np.float32), [None])
    s.complete(second, np.array([4]), np.zeros(1, dtype=np.float32), [])
    assert not s.has_work
