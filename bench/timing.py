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


def timed_steps(step: Callable[[], None], steps: int, warmup: int, device: str) -> list[float]:
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
