"""`tinker-bus export-metrics --model-id M --format tensorboard|jsonl --out DIR`: a model's curves, derived from
the event log exactly as the metrics part derives them (metrics_stream.ingest), written as files."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from bus_runtime.log_reader import model_key_filter, read_bus
from bus_runtime.settings import BusSettings, open_object_store
from metrics_stream.export import FORMATS, write_curves
from metrics_stream.ingest import ingest_reply, ingest_request
from metrics_stream.series import MetricsState


async def fold_model(settings: BusSettings, model_id: str, idle_timeout_s: float = 10.0) -> MetricsState:
    """Read the model's requests and replies from offset 0 into a fresh MetricsState."""
    state, blobs = MetricsState(), open_object_store(settings)
    topics = settings.topics
    async for record in read_bus(settings, [topics.train, topics.sample, topics.replies], model_key_filter([model_id]),
                                 idle_timeout_s=idle_timeout_s):
        ingest = ingest_reply if record.topic == topics.replies else ingest_request
        await ingest(state, record.value, blobs)
    return state


def cmd_export_metrics(args: argparse.Namespace) -> int:
    from tinker_bus.args import UsageError, settings_from_args
    from tinker_bus.log_tools import stderr

    settings = settings_from_args(args)
    state = asyncio.run(fold_model(settings, args.model_id, args.idle_timeout))
    curves = state.model(args.model_id, None)
    if curves is None or not curves.series:
        raise UsageError(f"--model-id {args.model_id!r}: no curves in the log of {settings.kafka_bootstrap} "
                         f"(topics {settings.topics.prefix}.*)")
    path = write_curves(curves, args.format, Path(args.out))
    points = sum(len(p) for p in curves.series.values())
    stderr.print(f"{points} points of {len(curves.series)} series -> {path}")
    return 0


def add_metrics_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    from tinker_bus.args import bus_options

    export = subparsers.add_parser("export-metrics", parents=[common_parent],
                                   help="write a model's curves (loss, tokens, lr, ...) as TensorBoard or JSONL")
    export.add_argument("--model-id", required=True, help="the model (training run id)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="tensorboard: event files for `tensorboard --logdir`; jsonl: rows for W&B")
    export.add_argument("--out", required=True, metavar="DIR", help="the directory to write to")
    export.add_argument("--idle-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="stop reading the broker after this long without data (default 10)")
    bus_options(export, for_up=False)
    export.set_defaults(func=cmd_export_metrics)
