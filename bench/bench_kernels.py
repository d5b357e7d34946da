"""The sampler's decode kernels alone, before (bench/kernels_baseline.py, main bed694d) and after issue 13's
kernel pass: per-row LoRA (shrink + expand on the 7 projections of one layer) and paged decode attention (one
layer), on Llama-3.2-1B / Llama-3.1-8B geometry, bf16, random weights.

Each variant is timed the way the engine runs it: `--reps` calls captured in one CUDA graph, replayed, timed with
CUDA events (no Python launch overhead, which the engine's graphs do not pay either). "GB/s" is the bytes the
call must move at least (LoRA: x, the A / B slots of the adapters in use, out read and written; attention: each
row's filled K and V, q and out) over its time. The attention rows also time the new kernel with the number of
splits forced, so the split threshold (attention._PROGRAMS_PER_SM) can be read off the table. Every new result
is checked against the baseline's (max |diff|) before it is timed.

    python bench/bench_kernels.py --log /tmp/bench-kernels.log
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import kernels_baseline as baseline
from bench.shapes import SHAPES
from sampler_consumer.attention import decode_attention_triton, decode_splits
from sampler_consumer.kernel_grid import sm_count
from sampler_consumer.lora_kernels import build_tiles, max_tiles, sgmv_expand, sgmv_shrink, shrink_splits

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
PAGE = 16
MAX_POSITIONS = 8192  # the engine's block table is this wide (the model's context) in its graphs


class Log:
    def __init__(self, path: str | None) -> None:
        self.file = open(path, "a") if path else None  # noqa: SIM115 - closed in close()

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def graph_seconds(fn: Callable[[], object], reps: int, replays: int) -> float:
    """Seconds per call of `fn`, `reps` calls captured in one CUDA graph (after a warm-up that compiles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / (replays * reps)


def projections(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of one decoder layer's 7 LoRA-wrapped projections."""
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    return {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
            "gate": (hidden, ffn), "up": (hidden, ffn), "down": (ffn, hidden)}


def new_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor,
             splits: int | None = None) -> None:
    sgmv_expand(sgmv_shrink(x, a, tiles, splits=splits), b, tiles, out)


def bench_lora(log: Log, name: str, rows: int, adapters: int, slots: int, rank: int, args) -> tuple[float, float]:
    """One layer's LoRA (7 projections), old vs new (then the new one at forced shrink split counts, per layer);
    returns (old, new) seconds per layer."""
    device = DEVICE
    per_adapter = rows // adapters
    segments = [(i * per_adapter, (i + 1) * per_adapter if i < adapters - 1 else rows, 1 + i)
                for i in range(adapters)]
    tiles = torch.tensor(build_tiles(segments, max_tiles(rows, slots)), dtype=torch.int32, device=device)
    forced = (1, 2, 4, 8, 16)
    totals = dict.fromkeys(["old", "new", *forced], 0.0)
    for proj, (n_in, n_out) in projections(SHAPES[name]).items():
        x = torch.randn(rows, n_in, device=device, dtype=DTYPE)
        a = torch.randn(slots, rank, n_in, device=device, dtype=DTYPE) / n_in**0.5
        b = torch.randn(slots, n_out, rank, device=device, dtype=DTYPE) / rank**0.5
        outs = [torch.zeros(rows, n_out, device=device, dtype=DTYPE) for _ in range(2)]
        calls = [partial(baseline.lora, x, a, b, tiles, outs[0]), partial(new_lora, x, a, b, tiles, outs[1])]
        for call in calls:
            call()
        diff = (outs[0].float() - outs[1].float()).abs().max().item()
        moved = (x.numel() + adapters * (a[0].numel() + b[0].numel()) + 2 * rows * n_out) * x.element_size()
        times = [graph_seconds(call, args.reps, args.replays) for call in calls]
        splits, _ = shrink_splits(tiles.shape[1], n_in, sm_count(device))
        totals["old"] += times[0]
        totals["new"] += times[1]
        for count in forced:
            totals[count] += graph_seconds(partial(new_lora, x, a, b, tiles, outs[1], count), args.reps,
                                           args.replays)
        log(f"| lora | {name} | {rows} | {adapters} | {proj} {n_in}x{n_out} | {1e6 * times[0]:.1f} | "
            f"{1e6 * times[1]:.1f} | {times[0] / times[1]:.2f} | {moved / times[0] / 1e9:,.0f} | "
            f"{moved / times[1] / 1e9:,.0f} | {splits} splits, max diff {diff:.1e} |")
    sweep = ", ".join(f"{count}: {1e6 * totals[count]:.1f}" for count in forced)
    log(f"| lora | {name} | {rows} | {adapters} | **layer** | {1e6 * totals['old']:.1f} | {1e6 * totals['new']:.1f} "
        f"| {totals['old'] / totals['new']:.2f} | | | new us per layer at forced splits {sweep} |")
    return totals["old"], totals["new"]


def bench_attention(log: Log, name: str, rows: int, length: int, args) -> tuple[float, float]:
    """One layer's decode attention, old vs new (auto splits), then the new kernel at forced split counts;
    returns (old, new auto) seconds."""
    device = DEVICE
    shape = SHAPES[name]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    dim = shape["hidden_size"] // heads
    pages_per_row = -(-length // PAGE)
    k = torch.randn(rows * pages_per_row + 1, PAGE, kv_heads, dim, device=device, dtype=DTYPE)
    v = torch.randn_like(k)
    table = torch.zeros(rows, MAX_POSITIONS // PAGE, device=device, dtype=torch.int32)
    table[:, :pages_per_row] = (1 + torch.randperm(rows * pages_per_row, device=device)).view(rows, -1).int()
    # Ragged like a running batch: lengths spread over [length / 2, length], mean ~3/4 length.
    lens = torch.linspace(length // 2, length, rows, device=device).int()
    q = torch.randn(rows, heads, dim, device=device, dtype=DTYPE)
    scale = dim**-0.5
    moved = (2 * int(lens.sum()) * kv_heads * dim + 2 * q.numel()) * q.element_size()
    expected = baseline.decode_attention(q, k, v, table, lens, scale).float()
    auto = decode_splits(rows, kv_heads, table.shape[1] * PAGE, sm_count(device))
    old = graph_seconds(lambda: baseline.decode_attention(q, k, v, table, lens, scale), args.reps, args.replays)
    results = {}
    for splits in [None, *(s for s in (1, 2, 4, 8, 16) if s != auto)]:
        diff = (decode_attention_triton(q, k, v, table, lens, scale, splits=splits).float() - expected).abs().max()
        results[splits] = graph_seconds(
            lambda s=splits: decode_attention_triton(q, k, v, table, lens, scale, splits=s), args.reps, args.replays)
        label = f"auto ({auto})" if splits is None else str(splits)
        log(f"| attention | {name} | {rows} | {length // 2}-{length} | {label} | {1e6 * old:.1f} | "
            f"{1e6 * results[splits]:.1f} | {old / results[splits]:.2f} | {moved / old / 1e9:,.0f} | "
            f"{moved / results[splits] / 1e9:,.0f} | max diff {diff:.1e} |")
    return old, results[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,llama-8b")
    parser.add_argument("--rows", default="64,256")
    parser.add_argument("--adapters", default="1,8", help="adapters in the batch (LoRA), rows split evenly")
    parser.add_argument("--slots", type=int, default=17, help="adapter slots (the engine's default: 16 + none)")
    parser.add_argument("--rank", type=int, default=32, help="slot rank (the engine's default max_lora_rank)")
    parser.add_argument("--lengths", default="192,1024", help="longest row's filled positions (attention)")
    parser.add_argument("--reps", type=int, default=20, help="calls per CUDA graph")
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--log", help="also append the output to this file")
    args = parser.parse_args()
    log = Log(args.log)
    torch.manual_seed(0)
    log(f"# {torch.cuda.get_device_name(DEVICE)}, {sm_count(DEVICE)} SMs; torch {torch.__version__}; bf16; LoRA slots "
        f"{args.slots} of rank {args.rank}; {args.reps} calls per graph x {args.replays} replays")
    log("| kernel | shape | rows | adapters / positions | projection / splits | old us | new us | speed-up | "
        "old GB/s | new GB/s | |\n|---|---|---|---|---|---|---|---|---|---|---|")
    per_step: dict[tuple[str, int], list[float]] = {}
    for name in args.shapes.split(","):
        layers = SHAPES[name]["num_hidden_layers"]
        for rows in (int(r) for r in args.rows.split(",")):
            for adapters in (int(a) for a in args.adapters.split(",")):
                old, new = bench_lora(log, name, rows, adapters, args.slots, args.rank, args)
                if adapters == max(int(a) for a in args.adapters.split(",")):
                    per_step.setdefault((name, rows), [0.0, 0.0])
                    per_step[(name, rows)][0] += layers * old
                    per_step[(name, rows)][1] += layers * new
            for length in (int(n) for n in args.lengths.split(",")):
                old, new = bench_attention(log, name, rows, length, args)
                if length == int(args.lengths.split(",")[0]):
                    per_step[(name, rows)][0] += layers * old
                    per_step[(name, rows)][1] += layers * new
    log("\n| shape | rows | LoRA (most adapters) + attention (shortest length) per decode step: old ms | new ms | "
        "saved ms |\n|---|---|---|---|---|")
    for (name, rows), (old, new) in per_step.items():
        log(f"| {name} | {rows} | {1e3 * old:.2f} | {1e3 * new:.2f} | {1e3 * (old - new):.2f} |")
    log.close()


if __name__ == "__main__":
    main()
