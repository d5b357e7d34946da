"""Bring up the full tinker-bus path for a benchmark: moto S3 + `tinker-bus up --ephemeral` as a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bus_runtime.net import free_port
from tinker_bus.infra import stop_process


@contextlib.contextmanager
def running_stack(model_dir: Path, device: str, log_path: Path, timeout_s: float = 600,
                  gateways: int = 1) -> Iterator[str]:
    """Yield the gateway's base URL once /healthz is healthy; stop everything on exit."""
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    port = free_port()
    # Tansu never wakes a long-polling fetch (docs/local-infra.md 2.2): each Kafka hop waits up to this long. 5 ms
    # halves the 10 ms this used to be (issue 14); a broker that wakes fetches (Apache Kafka) needs no such setting.
    env = {**os.environ, "TINKER_BUS_FETCH_MAX_WAIT_MS": os.environ.get("TINKER_BUS_FETCH_MAX_WAIT_MS", "5")}
    cmd = [sys.executable, "-m", "tinker_bus", "up", "--ephemeral", "--port", str(port), "--broker-port", "0",
           "--s3-endpoint", f"{host}:{s3_port}", "--s3-access-key", "bench", "--s3-secret-key", "bench",
           "--base-model", str(model_dir), "--device", device, "--data-dir", str(log_path.parent / "stack")]
    cmd += ["--gateways", str(gateways)]
    if importlib.util.find_spec("faust") is None:  # the GPU box gets the bus wheels without faust-streaming
        cmd.append("--no-metrics")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tinker-bus up exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).json().get("status") == "ok":
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"stack not healthy after {timeout_s}s; see {log_path}")
            time.sleep(1)
        yield url
    finally:
        stop_process(proc, timeout=60)
        s3.stop()
