"""What the bus adds to a call, hop by hop (issue 14): by default a one-datum, 8-token forward through the official
SDK; `--datums N --tokens T` sends N datums of T tokens, and `--mode step` times a training step the way
bench/path_steps.py's one_at_a_time does (forward_backward + optim_step submitted together, both awaited).

    python -m bench.call_latency --shape tiny --device cpu --calls 60     # this machine: the bus, not the model
    python -m bench.call_latency --shape llama-1b --device cuda           # GPU box
    python -m bench.call_latency --shape llama-1b --device cuda --datums 8 --tokens 2048 --mode step --calls 20

Per call, four clocks of one host (time.time()): the SDK's call and its result here, and from the session's event log
(the trace export, session_trace.py) the request envelope's `created_at` (the gateway publishes it), the result's
`started_at` (the trainer starts computing) and the reply envelope's `created_at` (the trainer publishes it). Calls
run one after another, so the i-th call is the i-th forward_backward event of the session. The hops:

  submit   SDK call -> gateway publishes   (SDK encode, HTTP POST, gateway decode + checks)
  to work  published -> compute starts    (produce, the trainer's fetch wait, intake decode, engine scheduling)
  compute  compute starts -> reply sent    (the backend's forward, encoding the result)
  back     reply sent -> SDK has it        (produce, the gateway listener's fetch wait, the long-poll answer, SDK
                                            decode; the SDK's retrieve_future is already waiting by then)

In step mode the step's critical path continues after the forward_backward's reply (the trainer applies the model's
events in order): `to optim` (forward_backward replied -> optim_step starts), `optim` (its compute and reply) and
`back` is then the optim_step's reply reaching the SDK. `fb back` (forward_backward replied -> the SDK has its
result) runs alongside `to optim` + `optim`, so it is not part of the sum; it is the big reply's trip.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

API_KEY = "tml-bench"
HOPS = ("submit", "to work", "compute", "back", "total")
Slice = tuple[float, float, float]  # (published, started, replied) of one request, seconds since the epoch


@dataclass(frozen=True)
class CallClocks:
    """One call's clocks, seconds since the epoch on one host. A step (forward_backward + optim_step) also has the
    optim_step's slice and the time the SDK had the forward_backward's result (`fb_end`); `sdk_end` is then the
    time it had both."""

    sdk_start: float
    published: float
    started: float
    replied: float
    sdk_end: float
    optim: Slice | None = None
    fb_end: float | None = None

    def hops(self) -> dict[str, float]:
        """Milliseconds per hop, keyed like HOPS (a step adds `to optim` and `optim` before `back`, and `fb back`)."""
        marks = [self.sdk_start, self.published, self.started, self.replied]
        names = list(HOPS[:3])
        if self.optim is not None:  # the optim_step is published alongside; its start continues the critical path
            marks += [self.optim[1], self.optim[2]]
            names += ["to optim", "optim"]
        spans = [1000 * (b - a) for a, b in itertools.pairwise([*marks, self.sdk_end])]
        out = {**dict(zip([*names, "back"], spans, strict=True)), "total": 1000 * (self.sdk_end - self.sdk_start)}
        if self.fb_end is not None:
            out["fb back"] = 1000 * (self.fb_end - self.replied)
        return out


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of `values`."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(calls: list[CallClocks]) -> dict[str, dict[str, float]]:
    """hop -> {"p50": ms, "mean": ms, "p99": ms} over the calls. The mean carries the rare slow call (a step that
    takes a snapshot) that the p50 drops, as a window of steps (bench/path_steps.py) does."""
    per_hop = [call.hops() for call in calls]
    out = {}
    for hop in per_hop[0]:
        values = sorted(h[hop] for h in per_hop)
        out[hop] = {"p50": statistics.median(values), "mean": statistics.fmean(values),
                    "p99": percentile(values, 0.99)}
    return out


def forward_slices(trace: dict[str, Any], request_type: str = "forward_backward") -> list[Slice]:
    """(published, started, replied) in seconds for each computed `request_type` event (forward_backward:
    forward-only or not) of a session trace, oldest first: its
    `queue` slice runs from the request's publication to the compute start, its compute slice to the reply."""
    queued = {e["args"]["request_id"]: e for e in trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") == "queue" and e["name"] == f"{request_type} queue"}
    computed = {e["args"]["request_id"]: e for e in trace["traceEvents"]
                if e.get("ph") == "X" and e.get("cat") == "compute" and e["name"] == request_type}
    rows = []
    for request_id, queue in queued.items():
        compute = computed.get(request_id)
        if compute is None:
            continue  # refused or not computed: no compute start to split the path at
        rows.append((queue["ts"] / 1e6, compute["ts"] / 1e6, (compute["ts"] + compute["dur"]) / 1e6))
    return sorted(rows)


def call_data(datums: int = 1, tokens: int = 8, vocab: int = 512) -> list:
    """`datums` SDK datums of `tokens` random token ids below `vocab` each, predicting the next token, every
    position weighted (1 x 8: the tiny call). Random ids: the SDK's zstd compresses them as it would real text,
    not 100x like a repeated pattern."""
    from bench.data import random_tokens
    from bench.path_steps import sdk_data

    return sdk_data(random_tokens(datums, tokens, vocab))


def measure(base_url: str, client, calls: int, warmup: int = 5, data: list | None = None,
            step: bool = False) -> list[CallClocks]:
    """`calls` forwards (`step`: forward_backward + optim_step, submitted together, both awaited) one at a time
    after `warmup` untimed ones, and their clocks from the session trace. `data`: the datums (default the tiny
    call's)."""
    import tinker

    from bench.path_steps import sdk_adam

    data = data if data is not None else call_data()
    adam = sdk_adam()

    def one() -> tuple[float, float, float | None]:
        t0 = time.time()
        if not step:
            client.forward(data, "cross_entropy").result()
            return t0, time.time(), None
        fb, opt = client.forward_backward(data, "cross_entropy"), client.optim_step(adam)
        fb.result()
        fb_end = time.time()
        opt.result()
        return t0, time.time(), fb_end

    for _ in range(warmup):
        one()
    sdk = [one() for _ in range(calls)]
    rest = tinker.RestClient(base_url=base_url, api_key=API_KEY)
    url = rest.export_session_trace(client.holder.get_session_id()).result()
    trace = httpx.get(url, timeout=120).json()
    slices = forward_slices(trace)[-calls:]
    optims: list[Slice | None] = list(forward_slices(trace, "optim_step")[-calls:]) if step else [None] * calls
    if len(slices) != calls or len(optims) != calls:
        raise RuntimeError(f"the session trace holds {len(slices)} computed forwards and {len(optims)} optim steps, "
                           f"expected {calls}")
    return [CallClocks(t0, *s, t1, optim=o, fb_end=fb_end)
            for (t0, t1, fb_end), s, o in zip(sdk, slices, optims, strict=True)]


def print_summary(summary: dict[str, dict[str, float]], label: str) -> None:
    print(f"\n{label}: per hop p50 / mean / p99 ms (the hops' means add up to the total's, fb back aside; "
          "their p50s need not)")
    for hop, stats in summary.items():
        print(f"  {hop:<8} {stats['p50']:7.1f} {stats['mean']:7.1f} {stats['p99']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--datums", type=int, default=1, help="datums per call")
    ap.add_argument("--tokens", type=int, default=8, help="tokens per datum")
    ap.add_argument("--mode", choices=("forward", "step"), default="forward",
                    help="forward: client.forward; step: forward_backward + optim_step (path_steps.one_at_a_time)")
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-latency")
    args = ap.parse_args()
    import tinker

    from bench.bus_stack import running_stack
    from bench.shapes import SHAPES, build_model_dir

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    with running_stack(model_dir, args.device, work / "stack.log") as url, \
            tinker.ServiceClient(base_url=url, api_key=API_KEY) as service:
        client = service.create_lora_training_client(base_model=str(model_dir), rank=32, train_unembed=False).result()
        data = call_data(args.datums, args.tokens, SHAPES[args.shape]["vocab_size"])
        calls = measure(url, client, args.calls, args.warmup, data, step=args.mode == "step")
    what = "forward" if args.mode == "forward" else "forward_backward + optim_step"
    print_summary(summarize(calls), f"{what} of {args.datums} x {args.tokens} tokens through the path, {args.shape} "
                                    f"on {args.device}, {args.calls} calls")


if __name__ == "__main__":
    main()
