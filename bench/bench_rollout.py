"""An RL rollout round through the full path: official tinker SDK 0.38 -> gateway -> Kafka (Tansu) -> sampler.

The round the cookbook's rl_basic fires: `--groups` distinct random prompts of `--prompt-len` tokens, each sampled
by `--group-size` concurrent `sample` calls with num_samples=1 (one RL group = the same prompt and adapter),
`--new-tokens` new tokens, stop=[] (every row runs to max_tokens), temperature 1. Then the same prompts as
`--groups` calls with num_samples=`--group-size`. Each shape runs `--rounds` times in a row.

The calls come from `--clients` processes (whole RL groups each; 1 = the cookbook, one SDK client in one process).
One SDK process spends milliseconds of CPU per call on its single event-loop thread, so with 1 client the round
measures the SDK as much as the server; more clients show what the server path itself sustains. During the first
num_samples=1 round, lone one-token requests from yet another process arrive one after another: their latency is
the time to first token of a request joining a running round (p50 / p99), free of the rollout client's own queue.

    python -m bench.bench_rollout --shape llama-1b --device cuda --clients 1
    python -m bench.bench_rollout --shape tiny --device cpu --groups 8 --group-size 4 --new-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus_stack import running_stack
from bench.call_latency import percentile
from bench.pyspy import profiled
from bench.shapes import SHAPES, build_model_dir


@dataclass(frozen=True)
class Plan:
    """What every client process does, round by round (the same for all; each takes its own share of groups)."""
    url: str
    model: str
    prompts: list[list[int]]
    group_size: int
    new_tokens: int
    rounds: list[bool] = field(default_factory=list)  # per round: True = one call per sample, False = num_samples
    lone: int = 0
    lone_delay_s: float = 0.5


@dataclass
class RoundResult:
    start: float
    end: float
    tokens: int
    failed: int
    messages: list[str]


async def _sampling_client(plan: Plan) -> Any:
    import tinker

    service = tinker.ServiceClient(base_url=plan.url, api_key="tml-bench")
    return await service.create_sampling_client(base_model=plan.model)


async def _round(client: Any, prompts: list, group_size: int, per_call: bool, params: Any) -> RoundResult:
    start = time.time()
    if per_call:
        calls = [client.sample(p, 1, params) for p in prompts for _ in range(group_size)]
    else:
        calls = [client.sample(p, group_size, params) for p in prompts]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    tokens = sum(len(s.tokens) for r in results if not isinstance(r, BaseException) for s in r.sequences)
    return RoundResult(start, time.time(), tokens, len(failures), [repr(f)[:300] for f in failures[:3]])


async def _rollout_client(plan: Plan, index: int, clients: int, barrier: Any, results: Any) -> None:
    from tinker import types

    client = await _sampling_client(plan)
    prompts = [types.ModelInput.from_ints(p) for p in plan.prompts[index::clients]]
    params = types.SamplingParams(max_tokens=plan.new_tokens, temperature=1.0, stop=[])
    # Warm-up (CUDA graphs of the common batch buckets, the gateway's and broker's paths), before the first barrier.
    await _round(client, prompts[:max(1, len(prompts) // 8)], plan.group_size, True,
                 types.SamplingParams(max_tokens=8, temperature=1.0, stop=[]))
    for r, per_call in enumerate(plan.rounds):
        await asyncio.to_thread(barrier.wait)
        results.put((r, index, await _round(client, prompts, plan.group_size, per_call, params)))


async def _lone_client(plan: Plan, barrier: Any, results: Any) -> None:
    from tinker import types

    client = await _sampling_client(plan)
    prompt = types.ModelInput.from_ints(plan.prompts[0][::-1])
    one_token = types.SamplingParams(max_tokens=1, temperature=1.0, stop=[])
    await client.sample(prompt, 1, one_token)
    latencies = []
    for r in range(len(plan.rounds)):
        await asyncio.to_thread(barrier.wait)
        if r != plan.rounds.index(True):
            continue
        await asyncio.sleep(plan.lone_delay_s)
        for _ in range(plan.lone):
            t0 = time.perf_counter()
            await client.sample(prompt, 1, one_token)
            latencies.append(time.perf_counter() - t0)
    results.put(latencies)


def _client_main(role: str, plan: Plan, index: int, clients: int, barrier: Any, results: Any) -> None:
    if role == "lone":
        asyncio.run(_lone_client(plan, barrier, results))
    else:
        asyncio.run(_rollout_client(plan, index, clients, barrier, results))


def bench(plan: Plan, clients: int, profile: Path | None) -> None:
    ctx = mp.get_context("spawn")  # the SDK runs a thread per process: never fork it
    parties = clients + 1 + (1 if plan.lone else 0)
    barrier, results, lone_results = ctx.Barrier(parties), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_client_main, args=("rollout", plan, i, clients, barrier, results), daemon=True)
             for i in range(clients)]
    if plan.lone:
        procs.append(ctx.Process(target=_client_main, args=("lone", plan, 0, clients, barrier, lone_results),
                                 daemon=True))
    for proc in procs:
        proc.start()
    calls = len(plan.prompts) * plan.group_size
    print(f"# {clients} rollout client process(es)\n| round | calls x num_samples | wall s | sampled tokens | tok/s | "
          f"failed calls |\n|---|---|---|---|---|---|", flush=True)
    lone_latencies: list[float] = []
    for r, per_call in enumerate(plan.rounds):
        shape = f"{calls} x 1" if per_call else f"{len(plan.prompts)} x {plan.group_size}"
        last_per_call = per_call and r == len(plan.rounds) - 1 - plan.rounds[::-1].index(True)
        phase: contextlib.AbstractContextManager = contextlib.nullcontext()
        if profile and last_per_call:
            phase = profiled(f"round-{shape.replace(' ', '')}", ("gateway", "sampler"), profile,
                             extra={"client0": procs[0].pid or 0})
        with phase:
            barrier.wait(timeout=900)
            parts = [results.get(timeout=900) for _ in range(clients)]
        got = [result for _, _, result in parts]
        wall = max(g.end for g in got) - min(g.start for g in got)
        tokens, failed = sum(g.tokens for g in got), sum(g.failed for g in got)
        round_number = sum(1 for x in plan.rounds[:r + 1] if x == per_call)
        print(f"| {round_number} | {shape} | {wall:.2f} | {tokens:,} | {tokens / wall:,.0f} | {failed} |", flush=True)
        for message in [m for g in got for m in g.messages][:3]:
            print(f"#   failure: {message}", flush=True)
    if plan.lone:
        lone_latencies = lone_results.get(timeout=900)
        print(f"# lone 1-token request arriving {plan.lone_delay_s:.1f} s into a {calls}-call round, "
              f"{len(lone_latencies)} in a row: p50 {1000 * statistics.median(lone_latencies):.0f} ms, "
              f"p99 {1000 * percentile(lone_latencies, 0.99):.0f} ms, max {1000 * max(lone_latencies):.0f} ms",
              flush=True)
    for proc in procs:
        proc.join(timeout=60)


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--groups", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=1, help="rollout client processes (whole groups each)")
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes on the one port (up --gateways)")
    parser.add_argument("--lone", type=int, default=20, help="lone 1-token requests during the first round")
    parser.add_argument("--lone-delay", type=float, default=0.5, help="seconds into the round the first one goes")
    parser.add_argument("--profile", default=None,
                        help="folder: py-spy the gateway, the sampler and client 0 during the last 1-sample round")
    parser.add_argument("--work-dir", default=None, help="model + stack logs (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-rollout-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / f"model-{args.shape}")
    print(f"# {args.shape} random weights on {args.device}; {args.groups} prompts x {args.group_size}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, stop=[], temperature 1; stack log {work / 'stack.log'}",
          flush=True)
    rng = np.random.default_rng(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.groups)]
    with running_stack(model_dir, args.device, work / "stack.log", gateways=args.gateways) as url:
        plan = Plan(url, str(model_dir), prompts, args.group_size, args.new_tokens,
                    [True] * args.rounds + [False] * args.rounds, args.lone, args.lone_delay)
        bench(plan, args.clients, Path(args.profile) if args.profile else None)


if __name__ == "__main__":
    main()
