"""What the bus adds to a tiny call, hop by hop (issue 14): a one-datum, 8-token forward through the official SDK.

    python -m bench.call_latency --shape tiny --device cpu --calls 60     # this machine: the bus, not the model
    python -m bench.call_latency --shape llama-1b --device cuda           # GPU box

Per call, four clocks of one host (time.time()): the SDK's call and its result here, and from the session's event log
(the trace export, session_trace.py) the request envelope's `created_at` (the gateway publishes it), the result's
`started_at` (the trainer starts computing) and the reply envelope's `created_at` (the trainer publishes it). Calls
run one after another, so the i-th call is the i-th forward_backward event of the session. The hops:

  submit   SDK call -> gateway publishes   (SDK encode, HTTP POST, gateway decode + checks)
  to work  published -> compute starts    (produce, the trainer's fetch wait, intake decode, engine scheduling)
  compute  compute starts -> reply sent    (the backend's forward, encoding the result)
  back     reply sent -> SDK has it        (produce, the gateway listener's fetch wait, the long-poll answer, SDK
                                            decode; the SDK's retrieve_future is already waiting by then)
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
import numpy as np

API_KEY = "tml-bench"
HOPS = ("submit", "to work", "compute", "back", "total")


@dataclass(frozen=True)
class CallClocks:
    """One call's clocks, seconds since the epoch on one host."""

    sdk_start: float
    published: float
    started: float
    replied: float
    sdk_end: float

    def hops(self) -> dict[str, float]:
        """Milliseconds per hop, keyed like HOPS."""
        marks = (self.sdk_start, self.published, self.started, self.replied, self.sdk_end)
        spans = [1000 * (b - a) for a, b in itertools.pairwise(marks)]
        return {**dict(zip(HOPS, spans, strict=False)), "total": 1000 * (self.sdk_end - self.sdk_start)}


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (0 <= q <= 1) of an ascending list."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def summarize(calls: list[CallClocks]) -> dict[str, dict[str, float]]:
    """hop -> {"p50": ms, "p99": ms} over the calls."""
    per_hop = [call.hops() for call in calls]
    out = {}
    for hop in HOPS:
        values = sorted(h[hop] for h in per_hop)
        out[hop] = {"p50": statistics.median(values), "p99": percentile(values, 0.99)}
    return out


def forward_slices(trace: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(published, started, replied) in seconds for each computed forward_backward event (forward-only or not) of a
    session trace, oldest first: its
    `queue` slice runs from the request's publication to the compute start, its compute slice to the reply."""
    queued = {e["args"]["request_id"]: e for e in trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") == "queue" and e["name"] == "forward_backward queue"}
    computed = {e["args"]["request_id"]: e for e in trace["traceEvents"]
                if e.get("ph") == "X" and e.get("cat") == "compute" and e["name"] == "forward_backward"}
    rows = []
    for request_id, queue in queued.items():
        compute = computed.get(request_id)
        if compute is None:
            continue  # refused or not computed: no compute start to split the path at
        rows.append((queue["ts"] / 1e6, compute["ts"] / 1e6, (compute["ts"] + compute["dur"]) / 1e6))
    return sorted(rows)


def tiny_datum():
    from tinker import types

    return types.Datum(model_input=types.ModelInput.from_ints(list(range(3, 11))),
                       loss_fn_inputs={"target_tokens": np.arange(4, 12, dtype=np.int64),
                                       "weights": np.ones(8, np.float32)})


def measure(base_url: str, client, calls: int, warmup: int = 5) -> list[CallClocks]:
    """`calls` tiny forwards one at a time (after `warmup` untimed ones) and their clocks from the session trace."""
    import tinker

    datum = tiny_datum()
    for _ in range(warmup):
        client.forward([datum], "cross_entropy").result()
    sdk = []
    for _ in range(calls):
        t0 = time.time()
        client.forward([datum], "cross_entropy").result()
        sdk.append((t0, time.time()))
    rest = tinker.RestClient(base_url=base_url, api_key=API_KEY)
    url = rest.export_session_trace(client.holder.get_session_id()).result()
    slices = forward_slices(httpx.get(url, timeout=60).json())[-calls:]
    if len(slices) != calls:
        raise RuntimeError(f"the session trace holds {len(slices)} computed forwards, expected {calls}")
    return [CallClocks(t0, *s, t1) for (t0, t1), s in zip(sdk, slices, strict=True)]


def print_summary(summary: dict[str, dict[str, float]], label: str) -> None:
    print(f"\n{label}: per hop p50 / p99 ms (the hops' p50s need not add up to the total's)")
    for hop in HOPS:
        print(f"  {hop:<8} {summary[hop]['p50']:7.1f} {summary[hop]['p99']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-latency")
    args = ap.parse_args()
    import tinker

    from bench.bus_stack import running_stack
    from bench.shapes import build_model_dir

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    with running_stack(model_dir, args.device, work / "stack.log") as url, \
            tinker.ServiceClient(base_url=url, api_key=API_KEY) as service:
        client = service.create_lora_training_client(base_model=str(model_dir), rank=32, train_unembed=False).result()
        calls = measure(url, client, args.calls)
    print_summary(summarize(calls), f"tiny forward through the path, {args.shape} on {args.device}, {args.calls} calls")


if __name__ == "__main__":
    main()
