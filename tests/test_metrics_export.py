"""export-metrics: curves from the real bus (Tansu + moto) to TensorBoard event files (read back record by record,
TFRecord framing and CRCs checked) and to W&B-style JSONL."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest
from tensorboardX.proto.event_pb2 import Event
from test_metrics_stream import MODEL, publish_steps

from bus_runtime.kafka_io import ensure_topics
from bus_runtime.settings import BusSettings
from tinker_bus.cli import main


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path: Path) -> list[Event]:
    """The TFRecord framing TensorBoard reads: u64 length, masked crc32c(length), data, masked crc32c(data)."""
    raw, events, at = path.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[at + 8:at + 12])[0] == _masked_crc32c(header)
        data = raw[at + 12:at + 12 + length]
        assert struct.unpack("<I", raw[at + 12 + length:at + 16 + length])[0] == _masked_crc32c(data)
        events.append(Event.FromString(data))
        at += 16 + length
    return events


def _scalars(events: list[Event]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, round(value.simple_value, 6)))
    return out


def _bus_args(settings: BusSettings) -> list[str]:
    return ["--kafka-bootstrap", settings.kafka_bootstrap, "--s3-endpoint", settings.s3_endpoint,
            "--s3-access-key", settings.s3_access_key, "--s3-secret-key", settings.s3_secret_key,
            "--bucket", settings.bucket, "--topic-prefix", settings.topics.prefix, "--idle-timeout", "3"]


async def test_export_metrics_writes_tensorboard_and_jsonl(settings: BusSettings, tmp_path: Path) -> None:
    await ensure_topics(settings)
    await publish_steps(settings, 3)
    tb, jl = tmp_path / "tb", tmp_path / "jl"
    for fmt, out in (("tensorboard", tb), ("jsonl", jl)):
        code = await asyncio.to_thread(main, ["export-metrics", "--model-id", MODEL, "--format", fmt, "--out",
                                              str(out), *_bus_args(settings)])
        assert code == 0
    files = list(tb.glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars = _scalars(read_tfrecords(files[0]))
    assert scalars["loss/sum"] == [(0, 5.0), (2, 4.0), (4, 3.0)]
    assert scalars["tokens"] == [(0, 10.0), (2, 11.0), (4, 12.0)]
    assert [v for _, v in scalars["learning_rate"]] == [0.001] * 3
    rows = [json.loads(line) for line in (jl / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in rows if "loss:sum" in r] == [0, 2, 4]
    assert rows[0]["loss:sum"] == 5.0 and rows[0]["tokens"] == 10 and "_timestamp" in rows[0]


def test_export_metrics_names_an_unknown_model(settings: BusSettings, tmp_path: Path, capsys) -> None:
    asyncio.run(ensure_topics(settings))
    with pytest.raises(SystemExit):
        main(["export-metrics", "--model-id", "nope", "--format", "jsonl", "--out", str(tmp_path),
              *_bus_args(settings)])
    assert "--model-id 'nope'" in capsys.readouterr().err
