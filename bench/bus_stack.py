"""Bring up the full tinker-bus path for a benchmark: moto S3 and `tinker-bus up --ephemeral`, each a subprocess.

moto runs in its own process, not in the benchmark's: a snapshot upload (hundreds of MB through moto's Python
server) would otherwise take the GIL from the SDK client that the benchmark times (issue 14: the two path
benchmarks disagreed). Snapshots are taken by step count only (every `snapshot_every_steps` steps, spaced by
`snapshot_write_share`), not also by time (TINKER_BUS_TRAINER_SNAPSHOT_INTERVAL_S=0): the first steps compile for a
minute, which put a time-triggered snapshot at a run-dependent step (bench/path_steps.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bus_runtime.net import free_port
from tinker_bus.infra import stop_process


@contextlib.contextmanager
def running_stack(model_dir: Path, device: str, log_path: Path, timeout_s: float = 600,
                  gateways: int = 1, code: Path | None = None) -> Iterator[str]:
    """Yield the gateway's base URL once /healthz is healthy; stop everything on exit. `code`: a checkout to run
    the stack from (its working directory, so `python -m` imports it first), instead of this one."""
    model_dir, log_path = model_dir.resolve(), log_path.resolve()  # the stack may run in another directory
    host, s3_port = "127.0.0.1", free_port()
    with open(log_path, "ab") as log:
        s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(s3_port)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    proc = None
    try:
        _wait_until(lambda: httpx.get(f"http://{host}:{s3_port}/", timeout=2).status_code < 500, s3, "moto S3",
                    60, log_path)
        port = free_port()
        # Tansu never wakes a long-polling fetch (docs/local-infra.md 2.2): each Kafka hop waits up to this long
        # (bus_runtime/fetch_pacing.py shortens it while a reply is due). A broker that wakes fetches (Apache Kafka)
        # needs no such setting.
        env = {"TINKER_BUS_FETCH_MAX_WAIT_MS": "5", "TINKER_BUS_TRAINER_SNAPSHOT_INTERVAL_S": "0", **os.environ}
        cmd = [sys.executable, "-m", "tinker_bus", "up", "--ephemeral", "--port", str(port), "--broker-port", "0",
               "--s3-endpoint", f"{host}:{s3_port}", "--s3-access-key", "bench", "--s3-secret-key", "bench",
               "--base-model", str(model_dir), "--device", device, "--data-dir", str(log_path.parent / "stack")]
        cmd += ["--gateways", str(gateways)]
        if importlib.util.find_spec("faust") is None:  # the GPU box gets the bus wheels without faust-streaming
            cmd.append("--no-metrics")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=code)
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).json().get("status") == "ok", proc,
                    "tinker-bus up", timeout_s, log_path)
        yield url
    finally:
        stop_process(proc, timeout=60)
        stop_process(s3, timeout=10)


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, name: str, timeout_s: float,
                log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not ready after {timeout_s}s; see {log_path}")
        time.sleep(0.2)
