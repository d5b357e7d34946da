"""The fold from events to per-model curves: pure, no Kafka (the faust agents and `export-metrics` both feed it).

Requests and replies arrive on different topics, in any interleaving (a rebuild from offset 0 reads them side by
side), so a request and its reply are joined by request_id whichever comes first:

- a reply alone gives what it carries: every loss / optimizer metric, errors, sampled tokens;
- the pair gives what needs both: learning rate (optim_step request), forward_backward tokens, and the time from
  request to reply (`*_seconds`), hence tokens per second.

Training points use the event's seq_id as their x (the SDK's order of the model's requests), so a curve comes out
the same whatever order the topics were read in; sampling points use their arrival count.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from bus_events import Envelope, EventType
from bus_events import payloads as p
from bus_runtime.metrics import forward_backward_tokens

MAX_UNMATCHED = 50_000  # request / reply halves waiting for their other half (oldest dropped)
MAX_POINTS = 20_000  # per series; above it every second point is dropped (the curve keeps its shape)
RECENT_WINDOW_S = 300.0  # what the throughput summary looks back over

Point = tuple[float, float, float]  # (x, unix time, value)


@dataclass
class _Half:
    """What one side of a request/reply pair contributes to the join."""

    created_at: float
    request_type: str = ""
    learning_rate: float | None = None
    tokens: int = 0
    error: bool = False


@dataclass
class ModelCurves:
    model_id: str
    tenant: str
    first_seen: float
    last_seen: float = 0.0
    series: dict[str, list[Point]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def add(self, name: str, x: float, t: float, value: float) -> None:
        points = self.series.setdefault(name, [])
        bisect.insort(points, (x, t, value))
        if len(points) > MAX_POINTS:
            del points[1::2]
        self.last_seen = max(self.last_seen, t)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def summary(self) -> dict[str, Any]:
        latest = {name: points[-1][2] for name, points in self.series.items() if points}
        return {"model_id": self.model_id, "first_seen": self.first_seen, "last_seen": self.last_seen,
                "counts": dict(self.counts), "latest": latest}

    def to_json(self, since: float = -1.0) -> dict[str, Any]:
        """The curves; `since`: only points with x > since (the dashboard's incremental poll)."""
        return {**self.summary(),
                "series": {name: [list(pt) for pt in points if pt[0] > since] for name, points in self.series.items()}}


@dataclass
class _Recent:
    t: float
    tenant: str
    kind: str  # "train_tokens", "sample_tokens", "reply", "error"
    amount: int


class MetricsState:
    """Every model's curves, keyed by model_id; `tenant` on each model scopes what a reader may see."""

    def __init__(self) -> None:
        self.models: dict[str, ModelCurves] = {}
        self._requests: OrderedDict[str, _Half] = OrderedDict()
        self._replies: OrderedDict[str, tuple[Envelope, _Half]] = OrderedDict()
        self._recent: deque[_Recent] = deque()
        self.records = 0

    # ------------------------------------------------------------------ input
    def request(self, env: Envelope, payload: Any) -> None:
        """A train or sample request (its payload: decoded for forward_backward / optim_step, else None)."""
        self.records += 1
        half = _Half(env.created_at, env.type.value)
        if isinstance(payload, p.OptimStep):
            half.learning_rate = payload.adam_params.learning_rate
        half.tokens = forward_backward_tokens(payload)
        waiting = self._replies.pop(env.request_id, None)
        if waiting is not None:
            self._joined(waiting[0], half, waiting[1])
        else:
            _put(self._requests, env.request_id, half)

    def reply(self, env: Envelope, result: p.Result, typed: Any) -> None:
        """A `result` event; `typed` is its decoded result (RESULT_TYPES) or None (error, or not decodable)."""
        self.records += 1
        curves = self._curves(env)
        t = env.created_at or time.time()
        x = float(env.seq_id) if env.seq_id is not None else float(curves.counts.get("replies", 0))
        curves.count("replies")
        half = _Half(t, result.request_type, error=result.error is not None)
        if result.error is not None:
            curves.count(f"errors:{result.error.category}")
            curves.count("errors")
            curves.add("errors", float(curves.counts["errors"]), t, float(curves.counts["errors"]))
            self._note(t, env.tenant, "error", 1)
        elif isinstance(typed, p.ForwardBackwardResult):
            curves.count("forward_backward")
            for name, value in typed.metrics.items():
                curves.add(name, x, t, float(value))
        elif isinstance(typed, p.OptimStepResult):
            curves.count("optim_step")
            for name, value in typed.metrics.items():
                curves.add(f"optim/{name}", x, t, float(value))
        elif isinstance(typed, p.SampleResult):
            curves.samples += 1
            tokens = sum(seq.tokens.numel for seq in typed.sequences)
            half.tokens = tokens
            curves.add("sample_tokens", float(curves.samples), t, float(tokens))
            curves.count("sample_tokens", tokens)
            self._note(t, env.tenant, "sample_tokens", tokens)
        self._note(t, env.tenant, "reply", 1)
        request = self._requests.pop(env.request_id, None)
        if request is not None:
            self._joined(env, request, half)
        else:
            _put(self._replies, env.request_id, (env, half))

    def _joined(self, reply_env: Envelope, request: _Half, reply: _Half) -> None:
        curves = self._curves(reply_env)
        t, seconds = reply.created_at, max(0.0, reply.created_at - request.created_at)
        kind = request.request_type
        if kind == EventType.SAMPLE.value:
            x = float(curves.samples)
            curves.add("sample_seconds", x, t, seconds)
            if reply.tokens and seconds > 0:
                curves.add("sample_tokens_per_second", x, t, reply.tokens / seconds)
            return
        x = float(reply_env.seq_id) if reply_env.seq_id is not None else float(curves.counts.get("replies", 0))
        if kind in (EventType.FORWARD_BACKWARD.value, EventType.OPTIM_STEP.value):
            curves.add(f"{kind}_seconds", x, t, seconds)
        if request.learning_rate is not None and not reply.error:
            curves.add("learning_rate", x, t, request.learning_rate)
        if request.tokens and not reply.error:
            curves.add("tokens", x, t, float(request.tokens))
            curves.count("tokens", request.tokens)
            self._note(t, reply_env.tenant, "train_tokens", request.tokens)
            if seconds > 0:
                curves.add("tokens_per_second", x, t, request.tokens / seconds)

    def _curves(self, env: Envelope) -> ModelCurves:
        curves = self.models.get(env.model_id)
        if curves is None:
            curves = self.models[env.model_id] = ModelCurves(env.model_id, env.tenant, env.created_at or time.time())
        return curves

    def _note(self, t: float, tenant: str, kind: str, amount: int) -> None:
        self._recent.append(_Recent(t, tenant, kind, amount))
        horizon = time.time() - RECENT_WINDOW_S
        while self._recent and self._recent[0].t < horizon:
            self._recent.popleft()

    # ------------------------------------------------------------------ output (tenant-scoped)
    def model(self, model_id: str, tenant: str | None) -> ModelCurves | None:
        """A model's curves if `tenant` may see them (None: any tenant, for the operator's export)."""
        curves = self.models.get(model_id)
        return curves if curves is not None and (tenant is None or curves.tenant == tenant) else None

    def list_models(self, tenant: str | None) -> list[dict[str, Any]]:
        return [c.summary() for c in sorted(self.models.values(), key=lambda c: -c.last_seen)
                if tenant is None or c.tenant == tenant]

    def throughput(self, tenant: str | None, window_s: float = 60.0) -> dict[str, float]:
        """Per second over the last `window_s`: training tokens, sampled tokens, replies, errors."""
        horizon = time.time() - window_s
        totals = {"train_tokens": 0, "sample_tokens": 0, "reply": 0, "error": 0}
        for item in self._recent:
            if item.t >= horizon and (tenant is None or item.tenant == tenant):
                totals[item.kind] += item.amount
        return {"window_s": window_s, "train_tokens_per_s": totals["train_tokens"] / window_s,
                "sample_tokens_per_s": totals["sample_tokens"] / window_s,
                "replies_per_s": totals["reply"] / window_s, "errors_per_s": totals["error"] / window_s}


def _put(table: OrderedDict, key: str, value: Any) -> None:
    table[key] = value
    if len(table) > MAX_UNMATCHED:
        table.popitem(last=False)
