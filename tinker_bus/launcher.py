"""`tinker-bus up`: the whole local stack as child processes, healthy or stopped, never half of it.

Order: S3 (SeaweedFS) -> broker (Tansu, its log in that S3 unless --ephemeral) -> topics + bucket ->
base models (converted once, in this process, so the spinner shows it) -> gateway, trainer, sampler,
metrics (one process each, `python -m tinker_bus <role>`, configured by TINKER_BUS_* variables) -> wait for
/healthz. Every child runs in its own process group, so a terminal's Ctrl-C reaches only this process,
which then stops the children in reverse order and reaps each one (infra.stop_process).

Once healthy, a part that dies (a SIGKILLed trainer, an OOM-killed broker) is restarted with backoff
(RESTART_BACKOFF_S) instead of tearing the stack down: the trainer replays from its snapshots, the gateway answers
the futures promised before (docs/recovery.md). Restarts are printed and reported in /healthz ("restarts").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from artifact_store.object_store import ObjectStore
from bus_runtime.health import instance_id, write_heartbeat
from bus_runtime.kafka_io import ensure_topics
from bus_runtime.net import bindable, free_port
from bus_runtime.settings import BusSettings, open_object_store
from tinker_bus import console as out
from tinker_bus.infra import S3Endpoint, SeaweedS3, TansuBroker, stop_process
from trainer_consumer.config import TrainerConfig

TANSU_BUCKET = "tansu"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Delay before restarting a part that died, by how many times it died in a row (a part that ran STABLE_AFTER_S
# since its last start starts the series again). Never gives up: the operator sees the restarts and the log.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STABLE_AFTER_S = 60.0


class StartupError(RuntimeError):
    """The stack could not come up; `log` is the file that says why."""

    def __init__(self, message: str, log: Path | None = None):
        super().__init__(message)
        self.log = log


class StopRequested(Exception):
    pass


@dataclass
class StackOptions:
    data_dir: Path
    gateway_port: int = 8000  # 0: any free port
    ephemeral: bool = False
    broker_port: int = 9092  # 0: any free port
    s3_port: int = 9000  # 0: any free port
    external_kafka: bool = False  # settings.kafka_bootstrap is an existing Kafka
    external_s3: bool = False  # settings.s3_endpoint is an existing S3 / MinIO
    api_keys: dict[str, str] | None = None
    health_timeout_s: float = 600.0
    log_level: str = "INFO"  # of the child processes
    trainer_env: dict[str, str] = field(default_factory=dict)  # TINKER_BUS_TRAINER_* from flags (backend, TP)
    gateways: int = 1  # gateway processes on the one port (SO_REUSEPORT when more than one)
    metrics: bool = True  # the faust-streaming metrics part (dashboard curves); training and sampling do not need it


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Restarts:
    """Backoff bookkeeping of one supervised part."""

    count: int = 0  # restarts so far
    streak: int = 0  # deaths in a row (reset once it ran STABLE_AFTER_S)
    due: float | None = None  # when the pending restart happens
    started: float = field(default_factory=time.monotonic)

    def died(self, now: float) -> float:
        """Schedule the restart; returns its delay."""
        if now - self.started >= STABLE_AFTER_S:
            self.streak = 0
        delay = RESTART_BACKOFF_S[min(self.streak, len(RESTART_BACKOFF_S) - 1)]
        self.streak += 1
        self.due = now + delay
        return delay

    def restarted(self, now: float) -> None:
        self.count += 1
        self.due, self.started = None, now


@dataclass
class Stack:
    settings: BusSettings
    options: StackOptions
    s3: SeaweedS3 | None = None
    broker: TansuBroker | None = None
    children: list[Child] = field(default_factory=list)
    restarts: dict[str, Restarts] = field(default_factory=dict)
    instance: str = field(default_factory=lambda: instance_id("supervisor"))

    @property
    def logs(self) -> Path:
        return self.options.data_dir / "logs"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.options.gateway_port}"

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.options.gateway_port = _port_or_free(self.options.gateway_port, "--port")
        self._start_s3()
        self._start_broker()
        with out.step("topics", "creating topics and bucket") as line:
            asyncio.run(prepare_bus(self.settings, timeout_s=60))
            prefix = self.settings.topics.prefix
            partitions = ", ".join(f"{t.removeprefix(prefix + '.')} {n}" for t, n in self.settings.topics.all().items())
            line["where"] = f"{prefix}.* [dim]partitions: {partitions}[/]"
        self._prepare_base_models()
        shared = ["--reuse-port"] if self.options.gateways > 1 else []
        for index in range(self.options.gateways):
            self._spawn("gateway", ["--host", "127.0.0.1", "--port", str(self.options.gateway_port), *shared],
                        self.gateway_url, name="gateway" if index == 0 else f"gateway-{index + 1}")
        trainer = TrainerConfig.from_env({**os.environ, **self.options.trainer_env})
        where = (f"backend megatron, tensor parallel over {trainer.megatron_tp_size} processes / GPUs"
                 if trainer.megatron_tp_size > 1 else f"backend {trainer.backend}, device {self.settings.device}")
        self._spawn("trainer", [], where, self.options.trainer_env)
        self._spawn("sampler", [], f"device {self.settings.device}")
        if self.options.metrics:
            self._spawn("metrics", [], "curves from the log, JSON for /dashboard")

    def _start_s3(self) -> None:
        if self.options.external_s3:
            out.done("S3", f"existing {self.settings.s3_endpoint}")
            return
        self.settings = local_s3_credentials(self.settings, self.options.data_dir)
        port = _port_or_free(self.options.s3_port, "--s3-port")
        data = self.options.data_dir / "s3"
        self.s3 = SeaweedS3(data, buckets=(self.settings.bucket, TANSU_BUCKET), port=port,
                            access_key=self.settings.s3_access_key, secret_key=self.settings.s3_secret_key,
                            log_file=self.logs / "seaweedfs.log")
        with out.step("S3", "starting SeaweedFS") as line:
            try:
                endpoint = self.s3.start()
            except (RuntimeError, TimeoutError) as exc:
                raise StartupError(f"SeaweedFS did not start: {exc}", self.s3.log_file) from exc
            keys = self.options.data_dir / S3_CREDENTIALS_FILE
            where = f"keys in {out.short_path(keys)}" if keys.exists() else "keys as configured"
            line["where"] = f"SeaweedFS http://{endpoint.endpoint} [dim]data {out.short_path(data)}, {where}[/]"
        self.settings = replace(self.settings, s3_endpoint=endpoint.endpoint, s3_secure=False)

    def _start_broker(self) -> None:
        if self.options.external_kafka:
            out.done("broker", f"existing Kafka {self.settings.kafka_bootstrap}")
            return
        port = _port_or_free(self.options.broker_port, "--broker-port")
        s3 = None
        if not self.options.ephemeral:
            s3 = S3Endpoint(self.settings.s3_endpoint, self.settings.s3_access_key, self.settings.s3_secret_key)
            if self.options.external_s3:  # a local SeaweedFS pre-creates it; an existing S3 may not have it
                _object_store(self.settings, TANSU_BUCKET).ensure_bucket()
        self.broker = TansuBroker(port=port, s3=s3, s3_bucket=TANSU_BUCKET, log_file=self.logs / "tansu.log")
        with out.step("broker", "starting Tansu") as line:
            try:
                self.broker.start()
            except (RuntimeError, TimeoutError) as exc:
                raise StartupError(f"Tansu did not start: {exc}", self.broker.log_file) from exc
            storage = f"log in s3://{TANSU_BUCKET} (durable)" if s3 else "memory (--ephemeral: lost on stop)"
            line["where"] = f"Tansu {self.broker.bootstrap} [dim]{storage}[/]"
        self.settings = replace(self.settings, kafka_bootstrap=self.broker.bootstrap)

    def _prepare_base_models(self) -> None:
        from bus_runtime.base_models import resolve_base_model

        for name in self.settings.base_models:
            with out.step("model", f"preparing {name} (the first run converts it, ~20 s)") as line:
                try:
                    path = out.short_path(resolve_base_model(name))
                except (FileNotFoundError, OSError) as exc:
                    raise StartupError(str(exc)) from exc
                line["where"] = name if path == name else f"{name} [dim]{path}[/]"

    def _spawn(self, role: str, args: list[str], where: str, extra_env: dict[str, str] | None = None,
               name: str | None = None) -> None:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1",
               "TINKER_BUS_LOG_LEVEL": self.options.log_level, **(extra_env or {})}
        env.pop("PORT", None)  # the gateway gets its port as --port; PORT must not leak into anything else
        env["TINKER_BUS_API_KEYS"] = format_api_keys(self.options.api_keys or {})
        name = name or role
        command, log = [sys.executable, "-m", "tinker_bus", role, *args], self.logs / f"{name}.log"
        child = Child(name, _popen(command, env, log), log, command, env)
        self.children.append(child)
        out.started_process(name, where, child.proc.pid, child.log)

    def _launch(self, child: Child) -> None:
        child.proc = _popen(child.command, child.env, child.log)

    # ------------------------------------------------------------------ run

    def wait_healthy(self) -> dict[str, Any]:
        """Poll /healthz until every part reports healthy; a child that dies meanwhile ends the wait."""
        deadline = time.monotonic() + self.options.health_timeout_s
        started = time.monotonic()
        report: dict[str, Any] = {}
        with out.console.status("waiting for /healthz") as status, httpx.Client(timeout=5.0) as client:
            while True:
                self.check_alive()
                report = fetch_health(client, f"{self.gateway_url}/healthz")
                if report.get("status") == "ok":
                    return report
                waiting_for = unhealthy_parts(report) or ["gateway"]
                status.update(f"waiting for {', '.join(waiting_for)} (loading models on the first start) "
                              f"[dim]{time.monotonic() - started:.0f} s[/]")
                if time.monotonic() > deadline:
                    raise StartupError(f"/healthz not healthy after {self.options.health_timeout_s:.0f} s: "
                                       f"{', '.join(waiting_for)} not ready", self._log_of(waiting_for[0]))
                time.sleep(0.5)

    def check_alive(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise StartupError(f"{child.name} exited with code {child.proc.returncode}", child.log)
        for name, infra in (("S3", self.s3), ("broker", self.broker)):
            if infra is not None and infra.proc is not None and infra.proc.poll() is not None:
                raise StartupError(f"{name} exited with code {infra.proc.returncode}", infra.log_file)

    def supervise(self) -> None:
        """Once running: restart every part that died, after its backoff; never stop the stack for it."""
        now = time.monotonic()
        for name, code, restart, log in self._parts():
            if code is None:
                continue
            state = self.restarts.setdefault(name, Restarts())
            if state.due is None:
                delay = state.died(now)
                out.console.print(f"[yellow]{name} exited with code {code}; restarting it in {delay:g} s[/] "
                                  f"[dim](restart {state.count + 1}, log {out.short_path(log) if log else '-'})[/]")
            elif now >= state.due:
                try:
                    restart()
                except (RuntimeError, TimeoutError, OSError) as exc:  # its next death check schedules another try
                    out.console.print(f"[red]{name} did not restart: {exc}[/]")
                state.restarted(time.monotonic())
                out.console.print(f"[green]{name} restarted[/] [dim]({state.count} restart(s) so far)[/]")
                self.report_restarts()

    def _parts(self) -> Iterator[tuple[str, int | None, Callable[[], object], Path | None]]:
        for child in self.children:
            yield child.name, child.proc.poll(), functools.partial(self._launch, child), child.log
        if self.s3 is not None and self.s3.proc is not None:
            yield "S3", self.s3.proc.poll(), self.s3.start, self.s3.log_file
        if self.broker is not None and self.broker.proc is not None:
            yield "broker", self.broker.proc.poll(), self._restart_broker, self.broker.log_file

    def _restart_broker(self) -> None:
        assert self.broker is not None
        self.broker.start()
        asyncio.run(prepare_bus(self.settings, timeout_s=60))  # an ephemeral broker comes back without topics

    def report_restarts(self) -> None:
        """What /healthz shows as "restarts": a heartbeat document of this supervisor (best effort: S3 may be the
        part that is down)."""
        detail = {"restarts": {name: r.count for name, r in self.restarts.items() if r.count}}
        with contextlib.suppress(Exception):
            write_heartbeat(open_object_store(self.settings), "supervisor", self.instance, detail)

    def _log_of(self, part: str) -> Path | None:
        return next((c.log for c in self.children if c.name == part), None)

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Children first (all at once: each stops on its own), then the broker, then S3 (slowest)."""
        with ThreadPoolExecutor(max_workers=max(1, len(self.children))) as pool:
            list(pool.map(lambda c: stop_process(c.proc, timeout=20), reversed(self.children)))
        if self.restarts:
            with contextlib.suppress(Exception):
                open_object_store(self.settings).delete(f"health/supervisor/{self.instance}.json")
        if self.broker is not None:
            self.broker.stop()
        if self.s3 is not None:
            self.s3.stop()


# ---------------------------------------------------------------------- helpers shared with the subcommands


async def prepare_bus(settings: BusSettings, timeout_s: float = 120.0) -> None:
    """Create topics and the bucket, retrying while Kafka / S3 are still starting (compose starts all at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await ensure_topics(settings)
            await asyncio.to_thread(open_object_store(settings).ensure_bucket)
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise StartupError(f"Kafka {settings.kafka_bootstrap} / S3 {settings.s3_endpoint} "
                                   f"not usable after {timeout_s:.0f} s: {exc}") from exc
            await asyncio.sleep(1.0)


def format_api_keys(keys: dict[str, str]) -> str:
    """The TINKER_BUS_API_KEYS form (bus_gateway.auth parses it): in the environment, not on the command line,
    where `ps` would show them."""
    return ",".join(f"{key}={tenant}" for key, tenant in keys.items())


def fetch_health(client: httpx.Client, url: str) -> dict[str, Any]:
    """The /healthz body, or {} while the gateway is not answering yet."""
    try:
        response = client.get(url)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def unhealthy_parts(report: dict[str, Any]) -> list[str]:
    components = report.get("components", {})
    return [name for name, value in components.items() if not (isinstance(value, dict) and value.get("healthy"))]


def _object_store(settings: BusSettings, bucket: str) -> ObjectStore:
    return open_object_store(replace(settings, bucket=bucket))


S3_CREDENTIALS_FILE = "s3-credentials.json"


def local_s3_credentials(settings: BusSettings, data_dir: Path) -> BusSettings:
    """The local SeaweedFS never runs with the documented default keys: unless the operator chose keys, `up`
    generates random ones once per data directory and keeps them in `<data-dir>/s3-credentials.json` (mode 0600),
    so a restart reuses them."""
    defaults = BusSettings()
    if (settings.s3_access_key, settings.s3_secret_key) != (defaults.s3_access_key, defaults.s3_secret_key):
        return settings
    path = data_dir / S3_CREDENTIALS_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"access_key": f"tb{secrets.token_hex(8)}", "secret_key": secrets.token_urlsafe(30)}, fh)
    found = json.loads(path.read_text())
    return replace(settings, s3_access_key=found["access_key"], s3_secret_key=found["secret_key"])


def _popen(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as log_file:
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _port_or_free(port: int, option: str) -> int:
    if port == 0:
        return free_port()
    try:
        bindable(port).close()
    except OSError as exc:
        raise StartupError(f"port {port} is in use ({exc.strerror}); pass {option} 0 for any free port, "
                           f"or another number") from exc
    return port


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Two stacks on one data directory would corrupt SeaweedFS: the second one stops here."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise StartupError(f"another `tinker-bus up` is using {data_dir}; stop it or pass --data-dir") from exc
        yield


@contextlib.contextmanager
def _signals_stop(handler: Callable[[int, Any], None]) -> Iterator[None]:
    # SIGHUP too: a closed terminal would otherwise kill only this process and orphan its children.
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_stop(signum: int, _frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


def _keep_stopping(signum: int, _frame: Any) -> None:
    with contextlib.suppress(OSError):
        out.console.print(f"[yellow]{signal.Signals(signum).name}: still stopping (SeaweedFS takes a few seconds)[/]")


def run_stack(settings: BusSettings, options: StackOptions) -> int:
    """Start everything, wait until healthy, run until SIGINT / SIGTERM or a part dies; stop all. Exit code."""
    mode = "ephemeral broker" if options.ephemeral else "durable: event log and checkpoints in S3"
    out.console.print(f"[bold]tinker-bus up[/] [dim]data {out.short_path(options.data_dir)} ({mode})[/]")
    stack = Stack(settings, options)
    code = 0
    with _signals_stop(_raise_stop):
        try:
            with _data_dir_lock(options.data_dir):
                try:
                    stack.start()
                    report = stack.wait_healthy()
                    _print_ready(stack, report)
                    last_report = time.monotonic()
                    while True:
                        stack.supervise()
                        if stack.restarts and time.monotonic() - last_report > 5:  # keep /healthz's view fresh
                            stack.report_restarts()
                            last_report = time.monotonic()
                        time.sleep(0.5)
                except StopRequested as stop:
                    out.console.print(f"[yellow]{stop}: stopping[/]")
                except StartupError as exc:
                    out.failure(str(exc), exc.log)
                    code = 1
                finally:
                    for sig in STOP_SIGNALS:
                        signal.signal(sig, _keep_stopping)
                    try:
                        with out.console.status("stopping"):
                            stack.stop()
                        out.console.print("[bold]stopped[/]: no process left behind")
                    except OSError:  # the terminal is gone (SIGHUP): stop without a word
                        stack.stop()
        except StartupError as exc:  # the lock: nothing was started
            out.failure(str(exc))
            code = 1
    return code


def _print_ready(stack: Stack, report: dict[str, Any]) -> None:
    out.console.print(out.health_table(report))
    key = "<one of the --api-key keys>" if stack.options.api_keys else "tml-local"  # never echo a secret
    auth = (f"{len(stack.options.api_keys)} API key(s)" if stack.options.api_keys
            else "development mode: any tml- key, tenant 'default'")
    out.console.print(
        f"[bold green]ready[/] {stack.gateway_url} [dim]({auth})[/]\n"
        f"  export TINKER_BASE_URL={stack.gateway_url} TINKER_API_KEY={key}\n"
        f"  events: Kafka {stack.settings.kafka_bootstrap}, topics {stack.settings.topics.prefix}.* "
        f"(docs/events.md)\n"
        f"  dashboard: {stack.gateway_url}/dashboard, Prometheus: {stack.gateway_url}/metrics "
        f"(trainer/sampler: metrics_url above)\n"
        "[dim]A part that dies is restarted (backoff 1 s .. 30 s; shown here and in /healthz). "
        "Ctrl-C stops everything.[/]"
    )
