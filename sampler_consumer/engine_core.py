"""The engine core: one thread that owns the device and everything that touches it.

Callers (the Kafka worker's asyncio loop, tests, benchmarks) only `submit` typed requests with a callback; the
thread loads base models, parses adapters into slots, schedules, runs and samples, and calls each request's
callback exactly once, with a GenOutput or a GenFailure whose message is never empty. One thread means CUDA state
that is thread-local (graphs, streams, allocator pools) is always used from the thread that made it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bus_events.payloads import prompt_output_problem
from sampler_consumer.config import SamplerConfig
from sampler_consumer.executor import Executor, PendingStep
from sampler_consumer.kv_pages import PagePool
from sampler_consumer.metrics import SamplerMetrics
from sampler_consumer.models import BaseModel
from sampler_consumer.paged_model import PagedModel
from sampler_consumer.requests import Done, GenFailure, GenOutput, GenRequest, describe
from sampler_consumer.scheduler import Group, SampledStep, Scheduler, StepPlan
from sampler_consumer.stops import StopChecker

log = logging.getLogger(__name__)

CPU_KV_TOKENS = 16384
REPORT_S = 5.0


def _kv_pages(base: BaseModel, config: SamplerConfig, bytes_per_token: int) -> int:
    if config.kv_cache_tokens:
        tokens = config.kv_cache_tokens
    elif base.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(base.device)
        tokens = int(free * config.kv_cache_fraction) // bytes_per_token
    else:
        tokens = CPU_KV_TOKENS
    return max(2, tokens // config.page_size + 1)  # + the scratch page


class ModelEngine:
    """One base model: its paged KV cache, scheduler and executor (engine thread only)."""

    def __init__(self, base: BaseModel, config: SamplerConfig, metrics: SamplerMetrics | None = None) -> None:
        config = config.resolved(base.device)
        self.base, self.config, self.metrics = base, config, metrics
        self._prefix_seen = (0, 0)  # the pool's (lookups, lookup_hits) already reported to `metrics`
        kernels = bool(config.kernels) and _has_triton()
        if kernels:
            base.lora.allocate_all()  # before any graph captures the slot stacks
        max_len = min(base.max_positions, 1 << 20)
        probe = PagedModel(base, 2, config.page_size, max_len, triton_attention=kernels)
        pages = _kv_pages(base, config, probe.kv_bytes_per_token)
        del probe
        self.model = PagedModel(base, pages, config.page_size, max_len, triton_attention=kernels)
        self.max_len = max_len
        max_pages_per_row = math.ceil(max_len / config.page_size)
        self.pool = PagePool(pages, config.page_size)
        self.scheduler = Scheduler(self.pool, base.lora.adapters, max_rows=config.max_batch_rows,
                                   max_pages_per_row=max_pages_per_row, max_prefill_tokens=config.max_prefill_tokens,
                                   stop_rule=self._stop_rule)
        self.executor = Executor(base, self.model, max_rows=config.max_batch_rows,
                                 max_pages_per_row=max_pages_per_row, graphs=bool(config.cuda_graphs) and kernels,
                                 kernels=kernels, prompt_logprob_chunk=config.prompt_logprob_chunk)
        self.steps = 0
        self._window = _Window()
        self._in_flight: _Launched | None = None  # launched, its tokens not read back yet
        log.info("sampler engine for %s: %d KV pages of %d positions, %d rows, graphs %s, kernels %s", base.name,
                 pages - 1, config.page_size, config.max_batch_rows, self.executor.graphs, kernels)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    def _stop_rule(self, request: GenRequest) -> StopChecker:
        return StopChecker(request.params.stop, self.base.eos_ids, self.base.decode)

    def add(self, request: GenRequest, done: Done) -> None:
        failure = self._check(request)
        if failure is not None:
            done(failure)
        else:
            self.scheduler.add(request, done)

    def _check(self, request: GenRequest) -> GenFailure | None:
        base = self.base
        bad = [t for t in request.prompt if not 0 <= t < base.vocab_size]
        if not request.prompt:
            return GenFailure("prompt is empty: sampling needs at least one token", "user")
        if bad:
            return GenFailure(f"prompt holds token ids outside the vocabulary [0, {base.vocab_size}): {bad[:5]}",
                              "user")
        if len(request.prompt) + request.params.max_tokens > self.max_len:
            return GenFailure(f"prompt ({len(request.prompt)} tokens) + sampling_params.max_tokens "
                              f"({request.params.max_tokens}) exceeds the model's context of {self.max_len}", "user")
        if not 0 <= request.topk_prompt_logprobs <= base.vocab_size:
            return GenFailure(f"topk_prompt_logprobs must be in [0, {base.vocab_size}], got "
                              f"{request.topk_prompt_logprobs}", "user")
        if not 0 <= request.topk_sample_logprobs <= base.vocab_size:
            return GenFailure(f"topk_sample_logprobs must be in [0, {base.vocab_size}], got "
                              f"{request.topk_sample_logprobs}", "user")
        problem = prompt_output_problem(len(request.prompt), request.target_prompt_ids, request.prompt_alt_tokens_k,
                                        base.vocab_size)
        return None if problem is None else GenFailure(problem, "user")

    def step(self) -> None:
        """Admit and launch one step (prefill, decode, sample), then read back the step launched before it: the
        device runs this step while the host turns the previous one's tokens into results, so it never waits for
        the scheduler. A failing part fails only the requests it was running."""
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        launched = None
        if not plan.empty:
            self.steps += 1
            launched = self._launch(plan)
        landing, self._in_flight = self._in_flight, launched
        if landing is not None:
            self._land(landing)
        if plan.empty:
            return
        seconds, prefilled = time.perf_counter() - started, sum(item.new_tokens for item in plan.prefills)
        self._window.add(seconds, len(plan.sample), prefilled)
        if self._window.due():
            self._report()
        if self.metrics is not None:
            self._observe(plan, seconds, prefilled, self.metrics)

    def _observe(self, plan: StepPlan, seconds: float, prefilled: int, metrics: SamplerMetrics) -> None:
        s, pool, name = self.scheduler, self.pool, self.base.name
        metrics.engine_step(name, tokens=len(plan.sample), prompt_tokens=prefilled, seconds=seconds,
                            running=len(s.rows), waiting=len(s.waiting),
                            kv_blocks_used=pool.num_pages - 1 - pool.free_pages, kv_blocks_total=pool.num_pages - 1)
        lookups, hits = self._prefix_seen
        for _ in range(pool.lookup_hits - hits):
            metrics.cache_lookup("prefix", True)
        for _ in range((pool.lookups - lookups) - (pool.lookup_hits - hits)):
            metrics.cache_lookup("prefix", False)
        self._prefix_seen = (pool.lookups, pool.lookup_hits)

    def _report(self) -> None:
        w, s, pool = self._window, self.scheduler, self.pool
        log.info("sampler engine %s: %d steps in %.1f s (%.1f ms/step busy), %.0f tokens/s sampled, %d prompt "
                 "tokens prefilled; %d rows running, %d requests waiting; KV pages %d free + %d cached of %d, "
                 "%d prefix pages reused so far", self.base.name, w.steps, w.elapsed, 1000 * w.busy / max(1, w.steps),
                 w.sampled / max(w.elapsed, 1e-9), w.prefilled, len(s.rows), len(s.waiting), pool.free_pages,
                 pool.cached_pages, pool.num_pages - 1, pool.hits)
        self._window = _Window()

    def _launch(self, plan: StepPlan) -> _Launched | None:
        """Queue the step's device work; None if nothing of it is left to read back."""
        prefill_logits = None
        outputs: list[GenOutput | None] = [None] * len(plan.prefills)
        if plan.prefills:
            try:
                prefill_logits, outputs = self.executor.prefill(plan.prefills)
                self.executor.copy_pages([pair for item in plan.prefills for pair in item.tail_copies])
            except Exception as exc:
                log.exception("prefill of %d prompts failed", len(plan.prefills))
                self.scheduler.fail([g for item in plan.prefills for g in item.groups],
                                    f"sampling failed in prefill: {describe(exc)}")
                plan = plan.without_failed(prefills=False)
                outputs = []
        decode_logits = None
        if len(plan.decode):
            try:
                decode_logits = self.executor.decode(self.scheduler, plan)
            except Exception as exc:
                log.exception("decode of %d rows failed", len(plan.decode))
                self.scheduler.fail(_groups(self.scheduler.rows[s] for s in plan.decode.tolist()),
                                    f"sampling failed in decode: {describe(exc)}")
                plan = plan.without_failed()
        try:
            pending = self._sample(plan, decode_logits, prefill_logits)
        except Exception as exc:
            log.exception("sampling %d rows failed", len(plan.sample))
            self._fail_step(plan, f"sampling failed: {describe(exc)}")
            return None
        return _Launched(plan, outputs, pending)

    def _land(self, launched: _Launched) -> None:
        """Wait for a launched step's tokens and record them (rows finish, answers go out)."""
        plan = launched.plan
        try:
            sampled = launched.pending.wait() if launched.pending is not None else _NOTHING_SAMPLED
        except Exception as exc:  # an error raised by the device while it ran the step
            log.exception("a step of %d rows failed on the device", len(plan.sample))
            self._fail_step(plan, f"sampling failed: {describe(exc)}")
            return
        self.scheduler.complete(plan, sampled.tokens, sampled.logprobs, launched.outputs, sampled.topk)
        if self.metrics is not None:
            now = time.monotonic()
            for item in plan.prefills:  # a prefilled request's first token came with this step
                for group in item.groups:
                    self.metrics.first_token(self.base.name, now - group.added_at)

    def _fail_step(self, plan: StepPlan, message: str) -> None:
        self.scheduler.fail(_groups(plan.sample) + [g for item in plan.prefills for g in item.groups], message)

    def _sample(self, plan: StepPlan, decode_logits: torch.Tensor | None,
                prefill_logits: torch.Tensor | None) -> PendingStep | None:
        parts = [] if decode_logits is None else [decode_logits]
        item_of_row = [i for i, item in enumerate(plan.prefills) for row in item.rows
                       if row.group.request.params.max_tokens > 0]
        if item_of_row and prefill_logits is not None:
            parts.append(prefill_logits.index_select(0, self.executor.upload(np.array(item_of_row, dtype=np.int64))))
        if not parts:
            return None
        logits = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])
        return self.executor.sample(self.scheduler, plan, logits)

    def fail_all(self, message: str) -> None:
        self._in_flight = None
        groups = _groups(self.scheduler.rows.values())
        self.scheduler.fail(groups, message)
        while self.scheduler.waiting:
            self.scheduler.waiting.popleft().done(GenFailure(message, "server"))


_NOTHING_SAMPLED = SampledStep(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))


@dataclass
class _Launched:
    plan: StepPlan
    outputs: list[GenOutput | None]  # per prefill item: its prompt logprobs, if asked
    pending: PendingStep | None  # None: no row samples (max_tokens = 0 prompts only)


class _Window:
    """What the engine did since its last log line (one every REPORT_S seconds while busy)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.sampled = self.prefilled = 0
        self.busy = 0.0

    def add(self, seconds: float, sampled: int, prefilled: int) -> None:
        self.steps += 1
        self.busy += seconds
        self.sampled += sampled
        self.prefilled += prefilled

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def due(self) -> bool:
        return self.elapsed >= REPORT_S


def _groups(rows: Any) -> list[Group]:
    seen: dict[int, Group] = {}
    for row in rows:
        seen.setdefault(id(row.group), row.group)
    return list(seen.values())


def _has_triton() -> bool:
    from sampler_consumer.attention import triton

    return triton is not None


def _safe(done: Done) -> Done:
    def deliver(result: GenOutput | GenFailure) -> None:
        try:
            done(result)
        except Exception:  # the caller's callback: never let it take the engine down
            log.exception("a result callback failed")
    return deliver


class EngineCore:
    """The device thread. `load(name)` builds a ModelEngine for a base model (called on the thread)."""

    def __init__(self, load: Callable[[str], ModelEngine], capacity: int = 2) -> None:
        self._load = load
        self.capacity = capacity
        self.engines: OrderedDict[str, ModelEngine] = OrderedDict()
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sampler-engine", daemon=True)
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()

    def stop(self) -> None:
        if self._started and self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join()

    def submit(self, model: str, request: GenRequest, done: Done) -> None:
        """Thread-safe; `done` is called exactly once, on the engine thread."""
        self.start()
        done = _safe(done)
        self._inbox.put(lambda: self._add(model, request, done))

    def call(self, fn: Callable[[EngineCore], Any]) -> Future:
        """Run fn(self) on the engine thread (e.g. to read an engine's state without racing it)."""
        self.start()
        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(fn(self))
            except Exception as exc:
                future.set_exception(exc)
        self._inbox.put(run)
        return future

    # ------------------------------------------------------------------ the thread
    def _add(self, model: str, request: GenRequest, done: Done) -> None:
        try:
            engine = self._engine(model)
        except Exception as exc:
            log.warning("cannot load base model %s: %s", model, describe(exc))
            done(GenFailure(f"base model {model!r} cannot be loaded: {describe(exc)}", "user"))
            return
        engine.add(request, done)

    def _engine(self, model: str) -> ModelEngine:
        if model in self.engines:
            self.engines.move_to_end(model)
            return self.engines[model]
        engine = self._load(model)
        self.engines[model] = engine
        for name in list(self.engines):
            if len(self.engines) <= self.capacity:
                break
            if not self.engines[name].has_work and name != model:
                del self.engines[name]
                log.info("unloaded base model %s", name)
        return engine

    def _run(self) -> None:
        while True:
            busy = any(engine.has_work for engine in self.engines.values())
            try:
                work = self._inbox.get(block=not busy)
                while True:
                    if work is None:  # stop(): answer whatever is still open, then end the thread
                        for engine in self.engines.values():
                            engine.fail_all("the sampler is shutting down")
                        return
                    work()
                    work = self._inbox.get_nowait()
            except queue.Empty:
                pass
            for engine in list(self.engines.values()):
                if engine.has_work:
                    try:
                        engine.step()
                    except Exception as exc:  # a bug outside the parts step() contains: fail its requests
                        log.exception("engine step failed")
                        engine.fail_all(f"sampler failure: {describe(exc)}")
