"""Settings of the full path against each other in one run (issue 14): each config is a fresh stack with its own
environment; per stack the two training patterns (bench/path_steps.py), a big step's hops and the tiny call's hops
(bench/call_latency.py); then the backend alone, once, as the baseline every row is a ratio of.

    python -m bench.path_ab --shape llama-1b --steps 40 \
        --config default --config door:TINKER_BUS_TRAINER_INTAKE_DOOR_HOST=127.0.0.1

A config is `name[@checkout][:VAR=value[,VAR=value...]]`; the stacks run in the order given (repeat a name to see
the spread). `@checkout` runs that config's stack from another copy of the code (e.g. `git archive` of an earlier
commit), so two commits meet in one call; this process (the SDK client, the baseline) stays on this one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.bench_training import RANK, bench_backend, tiny_step_compute
from bench.call_latency import API_KEY, measure, print_summary, summarize
from bench.data import random_tokens
from bench.path_steps import sdk_adam, sdk_data, time_patterns, window_steps
from bench.shapes import DEFAULT_BATCH, build_model_dir


@dataclass(frozen=True)
class Config:
    name: str
    env: dict[str, str]
    code: Path | None = None  # the checkout the stack runs from (None: this one)


def parse_config(text: str) -> Config:
    """`name[@checkout][:VAR=value,...]` -> Config (an empty value sets the variable to the empty string)."""
    head, _, assignments = text.partition(":")
    name, at, checkout = head.partition("@")
    code = Path(checkout).resolve() if at else None
    if code is not None and not (code / "tinker_bus").is_dir():
        raise ValueError(f"--config {text!r}: {checkout!r} is not a tinker-bus checkout (no tinker_bus/ in it)")
    env = {}
    for item in filter(None, assignments.split(",")):
        var, eq, value = item.partition("=")
        if not eq or not var.startswith("TINKER_BUS_"):
            raise ValueError(f"--config {text!r}: {item!r} is not TINKER_BUS_<NAME>=<value>")
        env[var] = value
    return Config(name or "default", env, code)


Hops = dict[str, dict[str, float]]  # hop -> {"p50", "mean", "p99"} ms (call_latency.summarize)


@dataclass(frozen=True)
class ConfigResult:
    per_step: dict[str, float]  # path_steps.time_patterns: seconds per step of each pattern
    step_hops: Hops
    tiny: Hops

    def tok_s(self, tokens: int) -> tuple[float, float]:
        """(one at a time, submitted ahead) tokens a second, for `tokens` a step."""
        return tokens / self.per_step["one-at-a-time"], tokens / self.per_step["submitted-ahead"]


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with `env` on top, restored after (the stack's processes inherit it)."""
    saved = {var: os.environ.get(var) for var in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def run_config(config: Config, model_dir: Path, device: str, rows: torch.Tensor, steps: int, warmup: int,
               work: Path) -> ConfigResult:
    import tinker

    from bench.bus_stack import running_stack

    data = sdk_data(rows.numpy())
    with environment(config.env), \
            running_stack(model_dir, device, work / f"stack-{config.name}.log", code=config.code) as url, \
            tinker.ServiceClient(base_url=url, api_key=API_KEY) as service:
        client = service.create_lora_training_client(base_model=str(model_dir), rank=RANK, train_unembed=False).result()
        per_step = time_patterns(client, data, sdk_adam(), steps, warmup)
        step_hops = summarize(measure(url, client, 15, 3, data, step=True))
        tiny = summarize(measure(url, client, 60))
    return ConfigResult(per_step, step_hops, tiny)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--config", action="append", type=parse_config, help="name[:TINKER_BUS_X=v,...]; repeatable")
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-path-ab")
    args = ap.parse_args()
    configs = args.config or [Config("default", {})]
    batch, seq = DEFAULT_BATCH[args.shape]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    vocab = __import__("json").loads((model_dir / "config.json").read_text())["vocab_size"]
    rows = torch.from_numpy(random_tokens(batch, seq, vocab))
    tokens = rows[:, 1:].numel()
    print(f"shape {args.shape}, batch {batch} x {seq}, {window_steps(args.steps)}-step windows, device {args.device}",
          flush=True)
    results = []
    for config in configs:  # the stacks first, while this process holds no GPU memory (the trainer is another)
        result = run_config(config, model_dir, args.device, rows, args.steps, args.warmup, work)
        results.append((config, result))
        one, ahead = result.tok_s(tokens)
        print(f"\n== {config.name} {config.code or ''} {config.env or ''}: one at a time {one:.0f} tok/s, "
              f"submitted ahead {ahead:.0f} tok/s", flush=True)
        print_summary(result.step_hops, f"a {batch} x {seq} step's hops")
        print_summary(result.tiny, "tiny forward (1 x 8 tokens)")
    backend = bench_backend(model_dir, args.device, rows, args.steps, args.warmup, 1, {}, "backend alone")
    tiny_backend = tiny_step_compute(model_dir, args.device)
    print(f"\nbackend alone: {backend.tok_s:.0f} tok/s; tiny forward p50 {tiny_backend['p50']:.1f} ms / p99 "
          f"{tiny_backend['p99']:.1f} ms")
    print(f"\n{'config':<14} {'one at a time':>22} {'submitted ahead':>22} {'tiny: bus adds p50 / p99 ms':>30}")
    for config, result in results:
        one, ahead = result.tok_s(tokens)
        total = result.tiny["total"]
        adds = (total["p50"] - tiny_backend["p50"], total["p99"] - tiny_backend["p99"])
        print(f"{config.name:<14} {one:>12.0f} ({one / backend.tok_s:.3f}x) {ahead:>12.0f} "
              f"({ahead / backend.tok_s:.3f}x) {adds[0]:>18.1f} / {adds[1]:.1f}")


if __name__ == "__main__":
    main()
