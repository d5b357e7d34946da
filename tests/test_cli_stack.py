"""The `tinker-bus` CLI: settings plumbing, and `tinker-bus up` run for real as a subprocess (Tansu, SeaweedFS,
gateway, trainer, sampler) — healthy, usable with the README's SDK example, durable, and gone after SIGTERM."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest

from bus_events import Topics
from bus_runtime.net import free_port
from bus_runtime.settings import BusSettings
from bus_runtime.testing import make_tiny_model
from tinker_bus.cli import (
    UsageError,
    build_parser,
    gateway_port,
    settings_from_args,
    trainer_backend_env,
    trainer_overrides,
)
from tinker_bus.launcher import S3_CREDENTIALS_FILE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.fixture(autouse=True)
def _no_inherited_bus_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TINKER_BUS_") or name in ("PORT", "USE_MEGATRON"):
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------- settings plumbing


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 7
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, tuple):
        return ("model-a", "model-b")
    if isinstance(value, Topics):
        return Topics(prefix="elsewhere")
    raise AssertionError(f"no way to change {value!r}")


def test_every_setting_reaches_child_processes_through_the_environment(monkeypatch):
    defaults = BusSettings()
    changed = replace(defaults, **{f.name: _changed(getattr(defaults, f.name)) for f in fields(BusSettings)})
    for name, value in changed.to_env().items():
        monkeypatch.setenv(name, value)
    assert BusSettings.from_env() == changed


def test_every_setting_is_in_the_readme_configuration_table():
    for name in BusSettings().to_env():
        assert f"`{name}`" in README, f"{name} missing from the README's configuration table"


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("TINKER_BUS_BUCKET", "from-env")
    monkeypatch.setenv("TINKER_BUS_DEVICE", "cuda:3")
    settings = settings_from_args(_args("trainer", "--bucket", "from-flag", "--base-model", "a", "--base-model", "b",
                                        "--topic-prefix", "p"))
    assert (settings.bucket, settings.device, settings.base_models) == ("from-flag", "cuda:3", ("a", "b"))
    assert settings.topics.train == "p.train.requests"


def test_port_and_use_megatron_of_the_original_server_keep_working(monkeypatch):
    assert gateway_port(_args("gateway")) == 8000
    monkeypatch.setenv("PORT", "8123")
    assert gateway_port(_args("up")) == 8123
    assert gateway_port(_args("up", "--port", "9001")) == 9001
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(UsageError, match="PORT"):
        gateway_port(_args("gateway"))

    assert trainer_backend_env(_args("trainer")) == {}
    monkeypatch.setenv("USE_MEGATRON", "true")
    assert trainer_backend_env(_args("trainer")) == {"TINKER_BUS_TRAINER_BACKEND": "megatron"}
    assert trainer_backend_env(_args("up", "--backend", "hf")) == {"TINKER_BUS_TRAINER_BACKEND": "hf_peft"}


def test_tensor_parallel_flag_reaches_the_trainer_config_and_up_s_child(monkeypatch):
    from trainer_consumer.config import TrainerConfig

    assert TrainerConfig.from_env(**trainer_overrides(_args("trainer", "--backend", "megatron",
                                                            "--tensor-parallel", "4"))).megatron_tp_size == 4
    assert trainer_backend_env(_args("up", "--backend", "megatron", "--tensor-parallel", "8")) == {
        "TINKER_BUS_TRAINER_BACKEND": "megatron", "TINKER_BUS_TRAINER_MEGATRON_TP_SIZE": "8"}
    with pytest.raises(UsageError, match="needs --backend megatron"):
        trainer_overrides(_args("trainer", "--tensor-parallel", "2"))
    with pytest.raises(UsageError, match="at least 1"):
        trainer_overrides(_args("up", "--backend", "megatron", "--tensor-parallel", "0"))
    monkeypatch.setenv("TINKER_BUS_TRAINER_BACKEND", "megatron")  # the backend from its variable is enough
    assert trainer_overrides(_args("trainer", "--tensor-parallel", "2")) == {"megatron_tp_size": 2}
    monkeypatch.setenv("TINKER_BUS_TRAINER_MEGATRON_TP_SIZE", "two")
    with pytest.raises(UsageError, match="TINKER_BUS_TRAINER_MEGATRON_TP_SIZE"):
        trainer_overrides(_args("trainer"))


def test_bad_usage_is_named_before_anything_starts(monkeypatch):
    monkeypatch.setenv("TINKER_BUS_BASE_MODELS", "")
    with pytest.raises(UsageError, match="base model"):
        settings_from_args(_args("up"))
    with pytest.raises(SystemExit):
        _args("trainer", "--backend", "tensorflow")


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


# ---------------------------------------------------------------------- tinker-bus up, for real


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


class Stack:
    """`tinker-bus up` as a subprocess, its output in a file; remembers every process it started."""

    def __init__(self, data_dir: Path, model: Path, *extra: str, ports: tuple[int, int, int] | None = None):
        self.port, self.broker_port, self.s3_port = ports or (free_port(), free_port(), free_port())
        self.output = data_dir.parent / f"up-{uuid.uuid4().hex[:6]}.out"
        argv = [sys.executable, "-m", "tinker_bus", "up", "--data-dir", str(data_dir), "--port", str(self.port),
                "--broker-port", str(self.broker_port), "--s3-port", str(self.s3_port), "--base-model", str(model),
                "--health-timeout", "240", *extra]
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "COLUMNS": "200"})
        self.descendants: dict[int, float] = {}  # pid -> create_time (pids get reused)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def remember_descendants(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.descendants[child.pid] = child.create_time()

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tinker-bus up exited with {self.proc.returncode}:\n{self.text()}"
            self.remember_descendants()
            if f"ready {self.url}" in self.text():
                report = httpx.get(f"{self.url}/healthz", timeout=10).json()
                self.remember_descendants()
                return report
            time.sleep(0.5)
        raise AssertionError(f"tinker-bus up not ready after {timeout} s:\n{self.text()}")

    def survivors(self) -> list[int]:
        alive = []
        for pid, created in self.descendants.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).create_time() == created:
                    alive.append(pid)
        return alive

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 90) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill_everything(self) -> None:
        """Cleanup after a failed test only; a passing test has nothing left to kill."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.survivors():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def _alive(pids: Iterable[int]) -> Iterator[psutil.Process]:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            process = psutil.Process(pid)
            process.cmdline()  # raises now, not in the caller, for a process that just exited
            yield process


T = TypeVar("T")


def _read_running(pids: Iterable[int], read: Callable[[psutil.Process], T]) -> list[T]:
    """`read` of each of `pids` still running: a part's own short-lived children (a compiler probe, `uname`) may
    be gone between listing and reading."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            out.append(read(psutil.Process(pid)))
    return out


@contextlib.contextmanager
def running_stack(data_dir: Path, model: Path, *extra: str,
                  ports: tuple[int, int, int] | None = None) -> Iterator[Stack]:
    stack = Stack(data_dir, model, *extra, ports=ports)
    try:
        yield stack
    finally:
        stack.kill_everything()


def _readme_sdk_example(base_url: str, model: Path) -> str:
    code = next(c for c in re.findall(r"```python\n(.*?)```", README, re.S) if "import tinker" in c)
    assert '"http://127.0.0.1:8000"' in code and '"HuggingFaceTB/SmolLM2-135M-Instruct"' in code
    return code.replace('"http://127.0.0.1:8000"', repr(base_url)).replace(
        '"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(model)))


def test_up_gets_healthy_serves_the_sdk_and_leaves_no_process_behind(tmp_path, tiny_model):
    with running_stack(tmp_path / "data", tiny_model, "--ephemeral") as stack:
        report = stack.wait_ready()
        assert report["status"] == "ok", report
        assert {"gateway", "s3", "kafka", "trainer", "sampler"} <= set(report["components"])
        assert all(part["healthy"] for part in report["components"].values()), report
        names = set(_read_running(stack.descendants, psutil.Process.name))
        assert {"tansu", "weed"} <= names and len(stack.descendants) >= 5, names

        example = subprocess.run([sys.executable, "-c", _readme_sdk_example(stack.url, tiny_model)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        assert example.returncode == 0, example.stdout + example.stderr
        losses = [float(line.split()[1]) for line in example.stdout.splitlines()[:3]]
        assert len(losses) == 3 and losses[2] < losses[0], example.stdout

        assert stack.stop(signal.SIGTERM) == 0, stack.text()
        assert stack.survivors() == [], f"left behind: {stack.survivors()}\n{stack.text()}"
        assert "stopped" in stack.text()


def test_up_with_a_tensor_parallel_megatron_trainer_trains_saves_and_samples(tmp_path, tiny_model):
    """`up --backend megatron --tensor-parallel 2`: one trainer process (rank 0, the Kafka consumer) drives one
    worker rank it spawned; the README's SDK example trains through them, saves the adapter for the sampler and
    samples it; stopping `up` stops the worker too."""
    pytest.importorskip("megatron.core")
    with running_stack(tmp_path / "data", tiny_model, "--ephemeral", "--backend", "megatron",
                       "--tensor-parallel", "2") as stack:
        report = stack.wait_ready()
        assert report["status"] == "ok", report
        (trainer,) = [p for p in _alive(stack.descendants) if "trainer" in p.cmdline()]
        ranks = [p for p in _alive(c.pid for c in trainer.children()) if "spawn_main" in " ".join(p.cmdline())]
        assert len(ranks) == 1, [p.cmdline() for p in _alive(c.pid for c in trainer.children())]

        example = subprocess.run([sys.executable, "-c", _readme_sdk_example(stack.url, tiny_model)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        assert example.returncode == 0, example.stdout + example.stderr + stack.text()
        lines = example.stdout.splitlines()
        losses = [float(line.split()[1]) for line in lines[:3]]
        assert len(losses) == 3 and losses[2] < losses[0], example.stdout
        assert len(lines) == 4, example.stdout  # the sampler loaded the saved adapter and answered

        stack.remember_descendants()
        assert stack.stop(signal.SIGTERM) == 0, stack.text()
        assert stack.survivors() == [], f"left behind: {stack.survivors()}\n{stack.text()}"


def test_up_restarts_a_dead_part_and_a_new_up_can_take_its_ports_at_once(tmp_path, tiny_model):
    """Issue 20 item 2: SIGKILL of the trainer and of the broker does not tear the stack down; the parts come back
    (printed, and in /healthz). Then `up` stopped and started again on the same ports starts at once."""
    with running_stack(tmp_path / "data", tiny_model, "--ephemeral") as stack:
        stack.wait_ready()
        for role, name in (("trainer", "trainer"), ("broker", "tansu")):
            victim = next(p for p in psutil.Process(stack.proc.pid).children(recursive=True)
                          if (role == "trainer" and p.cmdline()[-1:] == ["trainer"]) or p.name() == name)
            victim.kill()
            deadline = time.monotonic() + 120
            while f"{role} restarted" not in stack.text():
                assert stack.proc.poll() is None, f"up stopped:\n{stack.text()}"
                assert time.monotonic() < deadline, stack.text()
                time.sleep(0.5)
            assert f"{role} exited with code -9; restarting it in 1 s" in stack.text()
        deadline = time.monotonic() + 180
        while True:
            report = httpx.get(f"{stack.url}/healthz", timeout=10).json()
            if report["status"] == "ok" and report.get("restarts") == {"trainer": 1, "broker": 1}:
                break
            assert time.monotonic() < deadline, report
            time.sleep(1)
        assert stack.stop(signal.SIGTERM) == 0, stack.text()
        ports = (stack.port, stack.broker_port, stack.s3_port)
    with running_stack(tmp_path / "data2", tiny_model, "--ephemeral", ports=ports) as again:
        assert again.wait_ready()["status"] == "ok"  # no "port ... is in use" from connections in TIME-WAIT
        assert again.stop(signal.SIGTERM) == 0, again.text()


def test_up_is_durable_across_a_restart(tmp_path, tiny_model):
    from confluent_kafka import Consumer, Producer, TopicPartition
    from minio import Minio

    data_dir = tmp_path / "data"
    topic, marker = "tinker-bus.dead-letter", f"durability-probe-{uuid.uuid4().hex}".encode()
    with running_stack(data_dir, tiny_model) as first:
        first.wait_ready()
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{first.broker_port}", "acks": "all"})
        producer.produce(topic, key=b"probe", value=marker)
        assert producer.flush(30) == 0
        keys = json.loads((data_dir / S3_CREDENTIALS_FILE).read_text())  # random, never the documented default
        assert "minioadmin" not in keys.values() and (data_dir / S3_CREDENTIALS_FILE).stat().st_mode & 0o077 == 0
        s3 = Minio(f"127.0.0.1:{first.s3_port}", keys["access_key"], keys["secret_key"], secure=False)
        s3.put_object("tinker-bus", "probe/object", io.BytesIO(marker), len(marker))
        assert first.stop(signal.SIGINT) == 0, first.text()
        assert first.survivors() == []

    with running_stack(data_dir, tiny_model) as second:
        second.wait_ready()
        s3 = Minio(f"127.0.0.1:{second.s3_port}", keys["access_key"], keys["secret_key"], secure=False)
        assert s3.get_object("tinker-bus", "probe/object").read() == marker
        consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{second.broker_port}", "group.id": "probe",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, 0, 0)])
        values = []
        deadline = time.monotonic() + 30
        while marker not in values and time.monotonic() < deadline:
            record = consumer.poll(0.5)
            if record is not None and not record.error():
                values.append(record.value())
        consumer.close()
        assert marker in values, values
        assert second.stop(signal.SIGTERM) == 0, second.text()
        assert second.survivors() == []


def test_up_uses_an_existing_kafka_and_s3_instead_of_starting_them(tmp_path, tiny_model, broker, s3_endpoint):
    prefix = f"ext{uuid.uuid4().hex[:6]}"
    with running_stack(tmp_path / "data", tiny_model, "--kafka-bootstrap", broker.bootstrap, "--s3-endpoint",
                       s3_endpoint, "--topic-prefix", prefix, "--bucket", f"tb-{prefix}") as stack:
        report = stack.wait_ready()
        assert report["status"] == "ok", report
        assert report["components"]["kafka"]["bootstrap"] == broker.bootstrap
        names = set(_read_running(stack.descendants, psutil.Process.name))
        lines = _read_running(stack.descendants, psutil.Process.cmdline)
        parts = [line[line.index("tinker_bus") + 1] for line in lines if "tinker_bus" in line]
        assert "tansu" not in names and "weed" not in names, names
        assert sorted(parts) == ["gateway", "metrics", "sampler", "trainer"], parts
        assert stack.stop(signal.SIGTERM) == 0, stack.text()
        assert stack.survivors() == []
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics
    assert {f"{prefix}.train.requests", f"{prefix}.replies"} <= set(topics)
