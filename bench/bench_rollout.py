"""An RL rollout round through the full path: official tinker SDK 0.38 -> gateway -> Kafka (Tansu) -> sampler.

The round the cookbook's rl_basic fires: `--groups` distinct random prompts of `--prompt-len` tokens, each sampled
by `--group-size` concurrent `sample_async` calls with num_samples=1 (one RL group = the same prompt and adapter),
`--new-tokens` new tokens, stop=[] (every row runs to max_tokens), temperature 1. Then the same prompts as
`--groups` calls with num_samples=`--group-size`. Each shape runs `--rounds` times in a row. During the first
num_samples=1 round, lone one-token requests (another sampling client) arrive one after another: their latency
is the time to first token of a request joining a running round (p50 / p99).

    python -m bench.bench_rollout --shape llama-1b --device cuda
    python -m bench.bench_rollout --shape tiny --device cpu --groups 8 --group-size 4 --new-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bus_stack import running_stack
from bench.shapes import SHAPES, build_model_dir


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_round(client, prompts: list, group_size: int, per_call: bool, params) -> tuple[float, int, int, list]:
    """(wall s, sampled tokens, failed calls, failure messages) of one round."""
    if per_call:
        calls = [client.sample_async(prompt, 1, params) for prompt in prompts for _ in range(group_size)]
    else:
        calls = [client.sample_async(prompt, group_size, params) for prompt in prompts]
    t0 = time.perf_counter()
    results = await asyncio.gather(*calls, return_exceptions=True)
    wall = time.perf_counter() - t0
    failures = [r for r in results if isinstance(r, BaseException)]
    tokens = sum(len(s.tokens) for r in results if not isinstance(r, BaseException) for s in r.sequences)
    return wall, tokens, len(failures), [repr(f)[:300] for f in failures[:3]]


async def lone_requests(client, prompt, params, delay_s: float, count: int) -> list[float]:
    await asyncio.sleep(delay_s)
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        await client.sample_async(prompt, 1, params)
        latencies.append(time.perf_counter() - t0)
    return latencies


async def bench(url: str, model_dir: Path, args: argparse.Namespace) -> None:
    import numpy as np
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    rollout = service.create_sampling_client(base_model=str(model_dir))
    lone = service.create_sampling_client(base_model=str(model_dir))
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [types.ModelInput.from_ints(rng.integers(3, vocab, args.prompt_len).tolist())
               for _ in range(args.groups)]
    params = types.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop=[])
    one_token = types.SamplingParams(max_tokens=1, temperature=1.0, stop=[])
    lone_prompt = types.ModelInput.from_ints(rng.integers(3, vocab, args.prompt_len).tolist())

    # Warm-up: a short round (CUDA graphs of the common batch buckets, the gateway's and broker's paths).
    t0 = time.perf_counter()
    await one_round(rollout, prompts[:max(1, args.groups // 8)], args.group_size, True,
                    types.SamplingParams(max_tokens=8, temperature=1.0, stop=[]))
    print(f"# warm-up round: {time.perf_counter() - t0:.1f} s", flush=True)

    print("| round | calls x num_samples | wall s | sampled tokens | tok/s | failed calls |\n|---|---|---|---|---|---|")
    lone_latencies: list[float] = []
    for per_call in (True, False):
        for r in range(args.rounds):
            shape = (f"{args.groups * args.group_size} x 1" if per_call else f"{args.groups} x {args.group_size}")
            if per_call and r == 0 and args.lone:
                lone_task = asyncio.create_task(lone_requests(lone, lone_prompt, one_token, args.lone_delay,
                                                              args.lone))
                wall, tokens, failed, messages = await one_round(rollout, prompts, args.group_size, per_call, params)
                lone_latencies = await lone_task
            else:
                wall, tokens, failed, messages = await one_round(rollout, prompts, args.group_size, per_call, params)
            print(f"| {r + 1} | {shape} | {wall:.2f} | {tokens:,} | {tokens / wall:,.0f} | {failed} |", flush=True)
            for message in messages:
                print(f"#   failure: {message}", flush=True)
    if lone_latencies:
        print(f"# lone 1-token request arriving {args.lone_delay:.1f} s into a {args.groups * args.group_size}-call "
              f"round, {len(lone_latencies)} in a row: p50 {1000 * statistics.median(lone_latencies):.0f} ms, "
              f"p99 {1000 * percentile(lone_latencies, 0.99):.0f} ms, max {1000 * max(lone_latencies):.0f} ms",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--groups", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lone", type=int, default=20, help="lone 1-token requests during the first round")
    parser.add_argument("--lone-delay", type=float, default=0.5, help="seconds into the round the first one goes")
    parser.add_argument("--work-dir", default=None, help="model + stack logs (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-rollout-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / f"model-{args.shape}")
    print(f"# {args.shape} random weights on {args.device}; {args.groups} prompts x {args.group_size}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, stop=[], temperature 1; stack log {work / 'stack.log'}",
          flush=True)
    with running_stack(model_dir, args.device, work / "stack.log") as url:
        asyncio.run(bench(url, model_dir, args))


if __name__ == "__main__":
    main()
