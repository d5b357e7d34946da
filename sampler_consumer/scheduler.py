"""What runs in each engine step: which waiting requests join, which rows decode (pure Python + numpy).

Continuous batching: every step may admit waiting requests (their prompts are prefilled in that step and give
each of their rows its first token) next to the running rows' decode. A row leaves the moment it stops; its pages
go back at once. Identical prompts of the same adapter version admitted together are prefilled once (one
`PrefillItem`, full pages shared, the partial last page copied per row); a later identical prompt reuses the
cached full pages (PagePool's prefix cache) and prefills only the rest.

The scheduler runs one step ahead of the results: `schedule` leaves the state as it will be after the step
(lengths, tokens generated), so the engine can launch step n+1 before step n's tokens reach the host. A row that
turns out to have stopped at step n still decodes in step n + 1 (within pages it was promised); `complete` drops
that token.

Memory is promised up front: a row is admitted only if the pages for its whole prompt + max_tokens are free or
evictable beyond what running rows were promised, so a running row never waits for a page and nothing is ever
preempted. Per-row state the executor needs each step lives in arrays indexed by a row's fixed `slot`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from sampler_consumer.kv_pages import SCRATCH_PAGE, PagePool, page_digests
from sampler_consumer.requests import Done, GenFailure, GenOutput, GenRequest, Sequence, describe
from sampler_consumer.sampling import sample_seed
from sampler_consumer.stops import StopChecker

NO_ADAPTER = 0  # adapter slot 0: the base model


class _TooBig(ValueError):
    """A request that could never fit in the KV cache, however empty."""


class AdapterSlots(Protocol):
    def acquire(self, request: GenRequest) -> int | None:
        """The slot holding the request's adapter (loading it), None if every slot is busy; raises on a bad one."""

    def release(self, slot: int) -> None: ...


@dataclass
class Group:
    """One request: its rows (one per sample) and where its answer goes."""

    request: GenRequest
    done: Done
    stop: StopChecker
    adapter_slot: int = NO_ADAPTER
    rows: list[Row] = field(default_factory=list)
    output: GenOutput | None = None
    live: int = 0
    added_at: float = field(default_factory=time.monotonic)  # when it reached the engine (time to first token)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Anything computed over the whole prompt (so no cached prefix): prompt logprobs, top-k, extras."""
        request = self.request
        return request.prompt_logprobs or request.topk_prompt_logprobs > 0 or request.wants_prompt_extras


@dataclass
class Row:
    group: Group
    slot: int
    pages: list[int]
    reserved: int  # pages promised to this row, not yet allocated
    sequence: Sequence = field(default_factory=Sequence)
    done: bool = False


@dataclass
class PrefillItem:
    """One distinct prompt to prefill from `start`; every row in `rows` takes its first token from its logits."""

    prompt: list[int]
    start: int
    pages: list[int]
    adapter_slot: int
    adapter_key: Hashable
    rows: list[Row] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)  # every group whose rows are here (prompt logprobs)
    tail_copies: list[tuple[int, int]] = field(default_factory=list)  # (source page, row's own copy)
    full_prompt: bool = False  # prompt logprobs or extras asked: computed over the whole prompt, no cached prefix

    @property
    def new_tokens(self) -> int:
        return len(self.prompt) - self.start


@dataclass
class StepPlan:
    prefills: list[PrefillItem]
    decode: np.ndarray  # row slots decoding this step, grouped by adapter slot
    sample: list[Row]  # rows that get a token this step: the decode rows in order, then prefill rows
    decode_positions: np.ndarray  # per decode row: the position its token is written at (its length before)
    sample_steps: np.ndarray  # per sampled row: how many tokens it had before this one (its seed's step)

    @property
    def empty(self) -> bool:
        return not self.prefills and len(self.decode) == 0

    def without_failed(self, *, prefills: bool = True) -> StepPlan:
        """This plan less the rows failed since it was made (and less its prefills if `prefills` is False)."""
        keep = np.array([not row.done for row in self.sample], dtype=bool)
        decoding = keep[:len(self.decode)]  # the decode rows come first in `sample`
        return StepPlan(self.prefills if prefills else [], self.decode[decoding],
                        [row for row, kept in zip(self.sample, keep, strict=True) if kept],
                        self.decode_positions[decoding], self.sample_steps[keep])


class TopkRows(NamedTuple):
    """topk_sample_logprobs of one step: for the rows at `positions` of `plan.sample`, ids / logprobs [n, k_max]."""

    positions: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray


class SampledStep(NamedTuple):
    tokens: np.ndarray  # [len(plan.sample)]
    logprobs: np.ndarray
    topk: TopkRows | None = None  # None when no row asked for top-k logprobs


class Scheduler:
    def __init__(self, pool: PagePool, adapters: AdapterSlots, *, max_rows: int, max_pages_per_row: int,
                 max_prefill_tokens: int, stop_rule: Callable[[GenRequest], StopChecker]) -> None:
        self.pool, self.adapters = pool, adapters
        self.max_rows, self.max_prefill_tokens = max_rows, max_prefill_tokens
        self.page_size = pool.page_size
        self.stop_rule = stop_rule
        self.waiting: deque[Group] = deque()
        self.rows: dict[int, Row] = {}  # running rows by slot
        self.reserved = 0  # pages promised to running rows, not yet allocated
        self._free_slots = list(range(max_rows - 1, -1, -1))
        # Per row slot: what the executor reads each step (numpy, gathered by the decode batch's slots).
        self.block_table = np.full((max_rows, max_pages_per_row), SCRATCH_PAGE, dtype=np.int32)
        self.length = np.zeros(max_rows, dtype=np.int64)  # positions whose KV is written once launched steps ran
        self.adapter_slot = np.zeros(max_rows, dtype=np.int32)
        self.temperature = np.zeros(max_rows, dtype=np.float32)
        self.top_k = np.zeros(max_rows, dtype=np.int64)
        self.top_p = np.ones(max_rows, dtype=np.float32)
        self.seed = np.zeros(max_rows, dtype=np.int64)
        self.generated = np.zeros(max_rows, dtype=np.int64)  # tokens sampled by the steps launched so far
        self.max_tokens = np.zeros(max_rows, dtype=np.int64)
        self.topk_sample = np.zeros(max_rows, dtype=np.int64)  # topk_sample_logprobs: 0 = not asked

    # ------------------------------------------------------------------ intake
    def add(self, request: GenRequest, done: Done) -> None:
        self.waiting.append(Group(request, done, self.stop_rule(request)))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        """The next step; the state is advanced past it at once (see the module's docstring)."""
        prefills = self._admit()
        generated, max_tokens = self.generated, self.max_tokens
        decode = [row for row in self.rows.values() if 0 < generated[row.slot] < max_tokens[row.slot]]
        decode.sort(key=lambda row: self.adapter_slot[row.slot])  # LoRA segments: one per adapter
        for row in decode:
            self._ensure_page(row, int(self.length[row.slot]))
        sample = decode + [row for item in prefills for row in item.rows if row.group.request.params.max_tokens > 0]
        decode_slots = np.array([row.slot for row in decode], dtype=np.int64)
        sample_slots = np.array([row.slot for row in sample], dtype=np.int64)
        plan = StepPlan(prefills, decode_slots, sample, self.length[decode_slots], generated[sample_slots])
        for item in prefills:
            for row in item.rows:
                self.length[row.slot] = len(item.prompt)
        self.length[decode_slots] += 1
        generated[sample_slots] += 1
        return plan

    def _admit(self) -> list[PrefillItem]:
        items: dict[tuple, PrefillItem] = {}
        budget = self.max_prefill_tokens
        while self.waiting:
            group = self.waiting[0]
            request = group.request
            if request.num_samples > self.max_rows:
                self._reject(group, f"num_samples {request.num_samples} exceeds the {self.max_rows} rows this "
                                    "engine decodes at once (the service splits bigger requests)")
                continue
            if len(self.rows) + request.num_samples > self.max_rows:
                break
            key = (request.prefix_key, tuple(request.prompt), group.wants_prompt_logprobs,
                   id(group) if request.wants_prompt_extras else None)
            item = items.get(key)
            if item is None and items and budget < len(request.prompt):
                break  # this step's prefill is full; the first item always goes, however long
            try:
                slot = self.adapters.acquire(request)
            except Exception as exc:  # a bad adapter: this request's failure only
                self._reject(group, describe(exc))
                continue
            if slot is None:
                break  # every adapter slot is used by running rows: wait for one to finish
            try:
                placed = self._place(group, slot, item)
            except _TooBig as exc:
                self.adapters.release(slot)
                self._reject(group, str(exc))
                continue
            if placed is None:
                self.adapters.release(slot)
                break
            self.waiting.popleft()
            if item is None:
                items[key] = placed
                budget -= placed.new_tokens
        return list(items.values())

    def _reject(self, group: Group, message: str) -> None:
        self.waiting.popleft()
        group.done(GenFailure(message, "user"))

    def _place(self, group: Group, slot: int, item: PrefillItem | None) -> PrefillItem | None:
        """Pages and rows for `group` (joining `item` if it has the same prompt), or None if they don't fit now."""
        request, ps = group.request, self.page_size
        length = len(request.prompt)
        full, tail = divmod(length, ps)
        per_row = self.pages_for(length + request.params.max_tokens)
        # Every row owns its pages past the shared full ones (its copy of the partial page, its decode pages);
        # a new item also needs its prompt pages, of which the first row takes over the partial one.
        worst = full + request.num_samples * (per_row - full)
        if worst > self.pool.num_pages - 1:
            raise _TooBig(f"prompt ({length} tokens) + max_tokens ({request.params.max_tokens}) for "
                          f"{request.num_samples} samples needs {worst} KV pages of {ps} positions; this sampler "
                          f"has {self.pool.num_pages - 1}")
        matched: list[int] = []
        if item is None and not group.wants_prompt_logprobs:
            digests = page_digests(request.prefix_key, request.prompt, ps, (length - 1) // ps)
            matched = self.pool.match(digests)  # the last prompt token is always computed: it gives the logits
        new_prompt_pages = 0 if item is not None else full + (tail > 0) - len(matched)
        need = new_prompt_pages + request.num_samples * (per_row - full) - (1 if item is None and tail else 0)
        if need > self.pool.available - self.reserved:
            self.pool.release_all(matched)
            return None
        first_group = item is None
        if item is None:
            pages = matched + [self.pool.allocate() for _ in range(new_prompt_pages)]
            item = PrefillItem(list(request.prompt), len(matched) * ps, pages, slot, request.prefix_key,
                               full_prompt=group.wants_prompt_logprobs)
        group.adapter_slot = slot
        item.groups.append(group)
        for sample in range(request.num_samples):
            pages = item.pages[:full]
            for page in pages:
                self.pool.retain(page)
            if tail:
                if not item.rows:
                    pages.append(item.pages[full])  # the first row takes over the prefilled partial page
                else:
                    own = self.pool.allocate()
                    item.tail_copies.append((item.pages[full], own))
                    pages.append(own)
            item.rows.append(self._new_row(group, pages, per_row, request.first_sample + sample))
        if first_group:
            self.pool.release_all(item.pages[:full])  # the item's own hold on its full pages passes to the rows
        return item

    def _new_row(self, group: Group, pages: list[int], per_row: int, sample_index: int) -> Row:
        slot = self._free_slots.pop()
        params = group.request.params
        row = Row(group, slot, pages, per_row - len(pages))
        self.reserved += row.reserved
        self.block_table[slot, :] = SCRATCH_PAGE
        self.block_table[slot, :len(pages)] = pages
        self.length[slot] = 0
        self.adapter_slot[slot] = group.adapter_slot
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k if params.top_k > 0 else 0
        self.top_p[slot] = params.top_p
        self.seed[slot] = sample_seed(params.seed, sample_index)
        self.generated[slot] = 0
        self.max_tokens[slot] = params.max_tokens
        self.topk_sample[slot] = group.request.topk_sample_logprobs
        group.rows.append(row)
        group.live += 1
        self.rows[slot] = row
        return row

    def _ensure_page(self, row: Row, position: int) -> None:
        index = position // self.page_size
        if index == len(row.pages):
            page = self.pool.allocate()  # promised at admission, so it exists
            row.pages.append(page)
            self.block_table[row.slot, index] = page
            row.reserved -= 1
            self.reserved -= 1

    # ------------------------------------------------------------------ after the step
    def complete(self, plan: StepPlan, tokens: np.ndarray, logprobs: np.ndarray,
                 prompt_outputs: list[GenOutput | None], topk: TopkRows | None = None) -> None:
        """Record the step's sampled tokens (in `plan.sample` order) and finish the rows that stopped. Rows that
        finished or failed after the step was launched are skipped: their token was speculative."""
        for item, output in zip(plan.prefills, prompt_outputs, strict=True):
            if all(row.done for row in item.rows):
                continue  # failed since: its pages went back and must not be published
            for group in item.groups:
                group.output = GenOutput(sequences=[], prompt_cache_hit_tokens=item.start)
                if output is not None and group.request.wants_prompt_extras:  # the item's only group
                    group.output.target_logprobs = output.target_logprobs
                    group.output.alt_tokens, group.output.alt_logprobs = output.alt_tokens, output.alt_logprobs
                if output is not None and group.wants_prompt_logprobs:
                    group.output.prompt_logprobs = output.prompt_logprobs if group.request.prompt_logprobs else None
                    k = group.request.topk_prompt_logprobs
                    if k and output.topk_ids is not None and output.topk_logprobs is not None:
                        group.output.topk_ids = output.topk_ids[:, :k]
                        group.output.topk_logprobs = output.topk_logprobs[:, :k]
            self.pool.publish(item.pages[:len(item.prompt) // self.page_size],
                              page_digests(item.adapter_key, item.prompt, self.page_size,
                                           len(item.prompt) // self.page_size))
        if topk is not None:  # before any row below finishes and hands its sequence over
            for position, ids, values in zip(topk.positions.tolist(), topk.ids, topk.logprobs, strict=True):
                row = plan.sample[position]
                if not row.done:
                    k = self.topk_sample[row.slot]
                    row.sequence.topk.append((ids[:k], values[:k]))
        for row, token, logprob in zip(plan.sample, tokens.tolist(), logprobs.tolist(), strict=True):
            if row.done:
                continue
            seq = row.sequence
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            if row.group.stop.stops(seq.tokens):
                seq.stop_reason = "stop"
                self._finish(row)
            elif len(seq.tokens) >= self.max_tokens[row.slot]:
                self._finish(row)
        for item in plan.prefills:  # max_tokens = 0: nothing to sample, done after the prefill
            for row in item.rows:
                if not row.done and self.max_tokens[row.slot] == 0:
                    self._finish(row)

    def _finish(self, row: Row) -> None:
        row.done = True
        del self.rows[row.slot]
        self.pool.release_all(row.pages)
        self.reserved -= row.reserved
        row.pages, row.reserved = [], 0
        self._free_slots.append(row.slot)
        group = row.group
        group.live -= 1
        if group.live == 0:
            self.adapters.release(group.adapter_slot)
            assert group.output is not None
            group.output.sequences = [r.sequence for r in group.rows]
            group.done(group.output)

    def fail(self, groups: list[Group], message: str) -> None:
        """Answer `groups` with a server error and free what their rows hold (the engine stays up)."""
        for group in groups:
            if group.live == 0 and group.output is not None:
                continue
            for row in group.rows:
                if not row.done:
                    row.done = True
                    self.rows.pop(row.slot, None)
                    self.pool.release_all(row.pages)
                    self.reserved -= row.reserved
                    row.pages, row.reserved = [], 0
                    self._free_slots.append(row.slot)
            group.live = 0
            self.adapters.release(group.adapter_slot)
            group.output = GenOutput(sequences=[])
            group.done(GenFailure(message, "server"))
