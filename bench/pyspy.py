"""Sample the stack's processes with py-spy while a benchmark phase runs (all threads, idle included).

The raw output goes to files; `summarize` says, per thread, in which of our frames (or which leaf) the samples fell:
the evidence docs/benchmarks.md cites.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

OUR_PACKAGES = ("trainer_consumer", "sampler_consumer", "bus_runtime", "bus_events", "bus_gateway", "artifact_store",
                "loss_plugins", "tinker/", "bench/")


def role_pids(roles: Iterable[str]) -> dict[str, int]:
    """The pid of each running `python -m tinker_bus <role>` process (role, role-2, ... when there are several)."""
    import psutil

    wanted, pids = set(roles), {}
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if len(argv) >= 4 and argv[1:3] == ["-m", "tinker_bus"] and argv[3] in wanted:
            name = argv[3]
            for n in range(2, 64):  # `up --gateways N`: gateway, gateway-2, ...
                if name not in pids:
                    break
                name = f"{argv[3]}-{n}"
            pids[name] = proc.pid
    return pids


def _spy(pid: int, out: Path) -> subprocess.Popen:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", "600", "--rate", "100",
                             "--format", "raw", "--threads", "--idle", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def profiled(label: str, roles: Iterable[str], out: Path, extra: dict[str, int] | None = None,
             keep_raw: bool = bool(os.environ.get("BENCH_KEEP_PYSPY"))) -> Iterator[None]:
    """py-spy on each role (and on the `extra` processes, e.g. an SDK client) for the block's duration; prints each
    process's CPU use and where its samples fell afterwards (the raw files are removed unless `keep_raw`)."""
    pids = {**role_pids(roles), **(extra or {})}
    out.mkdir(parents=True, exist_ok=True)
    cpu_before = {role: _thread_cpu(pid) for role, pid in pids.items()}
    spies = {role: _spy(pid, out / f"{label}-{role}.txt") for role, pid in pids.items()}
    t0 = time.perf_counter()
    try:
        yield
    finally:
        wall = time.perf_counter() - t0
        for role, pid in pids.items():
            print(f"{label}, {role} process: {_cpu_report(cpu_before[role], _thread_cpu(pid), wall)}", flush=True)
        for spy in spies.values():
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        for spy in spies.values():
            spy.wait(timeout=60)
        for role in pids:
            raw = out / f"{label}-{role}.txt"
            if raw.exists():
                print(f"{label}, {role} process:\n{summarize(raw)}", flush=True)
                if not keep_raw:
                    raw.unlink()


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    import psutil

    try:
        return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}
    except psutil.Error:
        return {}


def _cpu_report(before: dict[int, float], after: dict[int, float], wall: float) -> str:
    """CPU seconds the process spent during the phase, and the busiest threads as a fraction of the wall time:
    a thread near 100 % is the wall, whatever the sampled stacks say."""
    spent = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    top = sorted(spent.items(), key=lambda kv: -kv[1])[:3]
    threads = ", ".join(f"thread {tid} {100 * cpu / wall:.0f} %" for tid, cpu in top)
    return f"{sum(spent.values()):.1f} CPU-s in {wall:.1f} s wall ({threads})"


def summarize(raw: Path, top: int = 8) -> str:
    """Samples per thread, and per thread the innermost frame of ours (or the leaf) that the samples fell in."""
    threads: collections.Counter[str] = collections.Counter()
    where: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread, calls = frames[0], frames[1:]
        ours = [f for f in calls if any(pkg in f for pkg in OUR_PACKAGES)]
        leaf = calls[-1] if calls else "?"
        threads[thread] += int(count)
        where[thread][f"{ours[-1] if ours else '-'} | {leaf}"[:150]] += int(count)
    lines = []
    for thread, total in threads.most_common():
        lines.append(f"  {thread}: {total} samples")
        for frame, n in where[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {frame}")
    return "\n".join(lines)
