"""Training throughput: bare transformers + PEFT vs our HF backend vs the full bus path, one table per run.

    python -m bench.bench_training --shape llama-1b --device cuda          # GPU box (device tool)
    python -m bench.bench_training --shape smollm2 --device cpu --steps 3  # CPU companion

Every figure is a ratio against the bare PEFT loop measured in the same run on the same batches.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from pathlib import Path

import numpy as np
import torch

from bench.call_latency import percentile, print_summary
from bench.data import datums_from_tokens, random_tokens
from bench.shapes import DEFAULT_BATCH, build_model_dir
from bench.timing import Row, peak_gib, print_table, profile_to, reset_peak, timed_steps

RANK = 32


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_bare(model_dir: Path, device: str, tokens: torch.Tensor, steps: int, warmup: int,
               profile: str | None = None) -> Row:
    from bench.bare_peft import make_bare_step

    reset_peak(device)
    model, step = make_bare_step(model_dir, device, tokens, RANK)
    times = timed_steps(step, steps, warmup, device)
    row = Row("bare transformers+PEFT", tokens[:, 1:].numel(), times, peak_gib(device))
    profile_to(profile, step, device, row.name)
    del model, step
    _free()
    return row


def bench_backend(model_dir: Path, device: str, tokens: torch.Tensor, steps: int, warmup: int,
                  adapters: int, options: dict, label: str, profile: str | None = None) -> Row:
    """Our HF+PEFT backend called directly: `adapters` LoRAs trained round-robin on the same batches."""
    from bus_events import payloads as p
    from bus_events.payloads import LoraSpec
    from trainer_consumer.backends.base import AdapterSpec
    from trainer_consumer.backends.hf_peft import HfPeftBackend

    reset_peak(device)
    backend = HfPeftBackend(device=device, **options)
    ids = [f"bench:train:{i}" for i in range(adapters)]
    for i, model_id in enumerate(ids):
        backend.create_adapter(model_id, AdapterSpec(str(model_dir), LoraSpec(rank=RANK, seed=i, train_unembed=False)))
    data = datums_from_tokens(tokens.numpy())
    params = p.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)
    turn = iter(range(1 << 30))

    def step() -> None:
        model_id = ids[next(turn) % adapters]
        backend.forward_backward(model_id, data, "cross_entropy", {}, forward_only=False)
        backend.optim_step(model_id, params)

    times = timed_steps(step, steps * adapters, warmup * adapters, device)
    row = Row(label, tokens[:, 1:].numel(), times, peak_gib(device))
    profile_to(profile, step, device, label)
    backend = None  # the last reference: lets _free() return its GPU memory
    _free()
    return row


def bench_bus(model_dir: Path, device: str, tokens: torch.Tensor, steps: int, warmup: int,
              out_dir: Path) -> tuple[Row, Row, dict[str, dict[str, float]]]:
    """The full path: tinker SDK -> gateway -> Kafka -> trainer -> reply, one step at a time and submitted ahead
    (bench/path_steps.py: windows of a multiple of the snapshot cadence), then the tiny call's hops."""
    import tinker

    from bench.bus_stack import running_stack
    from bench.call_latency import API_KEY, measure, summarize
    from bench.path_steps import sdk_adam, sdk_data, time_patterns, window_steps

    data = sdk_data(tokens.numpy())
    adam = sdk_adam()
    with running_stack(model_dir, device, out_dir / "stack.log") as url, \
            tinker.ServiceClient(base_url=url, api_key=API_KEY) as service:
        client = service.create_lora_training_client(base_model=str(model_dir), rank=RANK, train_unembed=False).result()
        per_step = time_patterns(client, data, adam, steps, warmup)
        latency = summarize(measure(url, client, 40))
    n = window_steps(steps)
    row = Row(f"full path, one step at a time ({n} steps)", tokens[:, 1:].numel(), [per_step["one-at-a-time"]],
              float("nan"))
    pipe = Row(f"full path, {n} steps submitted ahead", tokens[:, 1:].numel(), [per_step["submitted-ahead"]],
               float("nan"))
    return row, pipe, latency


def tiny_step_compute(model_dir: Path, device: str, n: int = 40, profile: str | None = None) -> dict[str, float]:
    """The same tiny forward on the backend alone (no bus), to subtract from the path's latency: the same adapter
    as the path's client (no LoRA on the unembedding)."""
    from bus_events.payloads import LoraSpec
    from trainer_consumer.backends.base import AdapterSpec
    from trainer_consumer.backends.hf_peft import HfPeftBackend

    backend = HfPeftBackend(device=device)
    backend.create_adapter("tiny:train:0", AdapterSpec(str(model_dir), LoraSpec(rank=RANK, seed=0,
                                                                                 train_unembed=False)))
    data = datums_from_tokens(np.arange(3, 12)[None])

    def forward() -> list[np.ndarray]:
        return backend.forward_backward("tiny:train:0", data, "cross_entropy", {}, True).logprobs

    times = sorted(1000 * t for t in timed_steps(forward, n, 5, device))
    profile_to(profile, forward, device, "tiny forward (1 x 8 tokens), backend alone")
    graphs = backend.graphs
    if graphs is not None:  # the same calls on the ordinary compiled decoder, without graphs (decoder_graphs.py)
        graphed = forward()
        backend.graphs = None
        plain = forward()
        ungraphed = sorted(1000 * t for t in timed_steps(forward, n, 5, device))
        backend.graphs = graphs
        gap = max(float(np.abs(g - w).max()) for g, w in zip(graphed, plain, strict=True))
        print(f"\ndecoder CUDA graphs {'on' if graphs.plan.enabled else 'OFF (see the log)'}, "
              f"{len(graphs.plan.graphs)} captured; max |logprob graphed - ordinary path| {gap:.2e}; backend tiny "
              f"forward without graphs p50 {statistics.median(ungraphed):.1f} ms / p99 "
              f"{percentile(ungraphed, 0.99):.1f} ms", flush=True)
    backend = None  # the last reference: lets _free() return its GPU memory
    _free()
    return {"p50": statistics.median(times), "p99": percentile(times, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--work-dir", default="/tmp/tinker-bus-bench")
    ap.add_argument("--skip", default="", help="comma list of: bus, multi, eager, tiny (backend-alone tiny forward)")
    ap.add_argument("--profile", help="append a torch.profiler kernel table of one step per variant to this file")
    args = ap.parse_args()
    batch, seq = DEFAULT_BATCH[args.shape]
    batch, seq = args.batch or batch, args.seq or seq
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    vocab = __import__("json").loads((model_dir / "config.json").read_text())["vocab_size"]
    tokens = torch.from_numpy(random_tokens(batch, seq, vocab))
    skip = set(filter(None, args.skip.split(",")))
    print(f"shape {args.shape}, batch {batch} x {seq}, LoRA r={RANK}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""), flush=True)

    rows, latency = [], None
    if "bus" not in skip:  # first, while this process holds no GPU memory (the trainer is another process)
        bus_row, pipe_row, latency = bench_bus(model_dir, args.device, tokens, args.steps, args.warmup, work)
        rows += [bus_row, pipe_row]
    rows.insert(0, bench_bare(model_dir, args.device, tokens, args.steps, args.warmup, args.profile))
    variants = [("tinker-bus backend, 1 adapter", {}, 1)]  # torch_compile: the backend's default for the device
    if "eager" not in skip:
        variants.append(("tinker-bus backend, no torch.compile, 1 adapter", {"torch_compile": False}, 1))
    if "multi" not in skip:
        variants.append((f"tinker-bus backend, {args.adapters} adapters round-robin", {}, args.adapters))
    for label, options, adapters in variants:
        steps = args.steps if adapters == 1 else max(1, args.steps // 2)
        rows.append(bench_backend(model_dir, args.device, tokens, steps, args.warmup if adapters == 1 else 1,
                                  adapters, options, label, args.profile))
    print_table(f"training, {args.shape}, {batch}x{seq} tokens/step", rows, baseline="bare transformers+PEFT")
    if latency is not None:
        print_summary(latency, "tiny forward (1 x 8 tokens) through the full path")
    if latency is not None and "tiny" not in skip:
        compute = tiny_step_compute(model_dir, args.device, profile=args.profile)
        path = latency["total"]
        print(f"tiny forward: path p50 {path['p50']:.1f} ms / p99 {path['p99']:.1f} ms; backend alone p50 "
              f"{compute['p50']:.1f} ms / p99 {compute['p99']:.1f} ms; the bus adds ~"
              f"{path['p50'] - compute['p50']:.1f} ms at p50, ~{path['p99'] - compute['p99']:.1f} ms at p99")


if __name__ == "__main__":
    main()
