"""Timing helpers shared by the benchmarks: synchronised wall clock, medians, peak memory, one table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(step: Callable[[], object], steps: int, warmup: int, device: str) -> list[float]:
    """Run `warmup` untimed steps, then `steps` timed ones; seconds per step (device synchronised)."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


@dataclass
class Row:
    name: str
    tokens_per_step: int
    step_s: list[float]
    peak_gib: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tok_s(self) -> float:
        return self.tokens_per_step / self.median_s


def print_table(title: str, rows: list[Row], baseline: str) -> None:
    base = next(r for r in rows if r.name == baseline)
    print(f"\n{title}")
    width = max(len(r.name) for r in rows) + 2
    print(f"{'variant':<{width}}{'tok/s':>12}{'ratio':>10}{'median step s':>15}{'peak GiB':>10}  (ratio vs {baseline})")
    for r in rows:
        print(f"{r.name:<{width}}{r.tok_s:>12.0f}{r.tok_s / base.tok_s:>9.3f}x{r.median_s:>15.4f}{r.peak_gib:>10.2f}")


def profile_to(path: str | None, fn: Callable[[], object], device: str, label: str) -> None:
    """One run of `fn` under torch.profiler, the top kernels by GPU time written to `path` (skipped if None).

    The per-category totals at the top say what bounds the step: GEMMs (compute), element-wise / reduction
    kernels (memory), or gaps between kernels (launch and host overhead: wall time minus kernel time)."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    wall_ms = 1000 * (time.perf_counter() - t0)
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    kernel_ms = sum(e.device_time_total for e in events) / 1000
    gemm_ms = sum(e.device_time_total for e in events if _kind(e.key) == "gemm") / 1000
    attention_ms = sum(e.device_time_total for e in events if _kind(e.key) == "attention") / 1000
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    with open(path, "a") as out:
        out.write(f"\n### {label}\nwall {wall_ms:.1f} ms (under the profiler); GPU kernels {kernel_ms:.1f} ms, "
                  f"of which "
                  f"GEMM {gemm_ms:.1f} ms, attention {attention_ms:.1f} ms, other (element-wise, reductions, copies) "
                  f"{kernel_ms - gemm_ms - attention_ms:.1f} ms; idle/launch gaps "
                  f"~{max(0.0, wall_ms - kernel_ms):.1f} ms\n")
        out.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90))
        out.write("\n")


def _kind(kernel: str) -> str:
    lowered = kernel.lower()
    if any(tag in lowered for tag in ("flash", "fmha", "attention")):
        return "attention"
    if any(tag in lowered for tag in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")):
        return "gemm"
    return "other"
