"""`tinker-bus replay` and `tinker-bus export-log`: reproduce a model from the event log; archive a run's events.

    tinker-bus replay --model-id M --out DIR [--until-seq N] [--from-snapshot] [--from-file LOG] [--offline]
    tinker-bus export-log (--model-id M | --session-id S)... --out FILE [--no-replies]

`replay` rebuilds model M through the trainer's own engine and backend (trainer_consumer/replay.py) and writes
DIR/adapter_config.json + DIR/adapter_model.safetensors (PEFT) and DIR/report.json: steps applied, per-step loss
and metrics, and the sha256 of the replayed weights beside the live checkpoints'. It exits 1 if a live
checkpoint or a live reply it could compare differs. `export-log` writes the model's (or every training model of
a session's) events and replies to FILE, with claim-checked payloads inlined; `replay --from-file FILE` takes it,
on any machine (`--offline`: no S3 at all). Both show rich progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from bus_runtime.settings import open_object_store

log = logging.getLogger("tinker_bus")
# emoji=False: model ids like "s:train:0" are not emoji codes.
stderr = Console(stderr=True, highlight=False, emoji=False)
stdout = Console(highlight=False, emoji=False)


class _LiveProgress:
    """Two rich progress lines: records read from the log, and what the engine applied."""

    def __init__(self, read_label: str, second_label: str | None):
        self.progress = Progress(TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=stderr,
                                 transient=False)
        self.read_task: TaskID = self.progress.add_task(read_label, total=None, detail="")
        self.second: TaskID | None = self.progress.add_task(second_label, total=None, detail="") \
            if second_label else None

    def __enter__(self) -> _LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def read(self, count: int, total: int | None) -> None:
        self.progress.update(self.read_task, completed=count, total=total)

    def applied(self, events: int, steps: int) -> None:
        assert self.second is not None
        self.progress.update(self.second, completed=steps, detail=f"{events} events applied")

    def exported(self, count: int) -> None:
        assert self.second is not None
        self.progress.update(self.second, completed=count)


# ---------------------------------------------------------------------- replay


def cmd_replay(args: argparse.Namespace) -> int:
    from bus_runtime.log_reader import model_key_filter, read_bus
    from tinker_bus.args import settings_from_args
    from trainer_consumer.config import TrainerConfig
    from trainer_consumer.replay import ReplayError, ReplayRequest, replay_model
    from trainer_consumer.replay.event_log import iterate_file, read_file

    settings = settings_from_args(args)
    _quiet_logs()
    config = TrainerConfig.from_env()
    if args.threads is not None:
        config = replace(config, torch_threads=args.threads)
    if config.torch_threads > 0:
        import torch

        torch.set_num_threads(config.torch_threads)
    live = None if args.offline else _objects(settings)
    with _LiveProgress("events read", "steps applied") as progress:
        records: AsyncIterator[Any]
        if args.from_file:
            header, file_records = read_file(Path(args.from_file))
            topics = header.get("topics", {})
            train, replies = topics["train"], None if args.no_live else topics.get("replies")
            records = iterate_file(file_records, progress=progress.read)
            source = {"kind": "file", "path": str(Path(args.from_file).resolve()),
                      "exported_at": header.get("exported_at"), "exported_from": header.get("source")}
        else:
            train, replies = settings.topics.train, None if args.no_live else settings.topics.replies
            records = read_bus(settings, [train] + ([replies] if replies else []), model_key_filter([args.model_id]),
                               idle_timeout_s=args.idle_timeout, progress=progress.read)
            source = {"kind": "bus", "kafka": settings.kafka_bootstrap, "topic": train}
        request = ReplayRequest(args.model_id, Path(args.out), train, replies, args.until_seq, args.from_snapshot)
        try:
            report = asyncio.run(replay_model(records, request, live=live, config=config, device=settings.device,
                                              on_applied=progress.applied, source=source,
                                              tenant_keys=settings.tenant_keys,
                                              reply_key=settings.reply_signing_key))
        except ReplayError as exc:
            stderr.print(f"[bold red]✗ replay failed:[/] {escape(str(exc))}")
            return 2
    _print_replay(report)
    return 1 if _mismatches(report) else 0


def _mismatches(report: dict[str, Any]) -> list[str]:
    bad = [c["path"] for c in report["checkpoints"] if c.get("match") is False]
    bad += [c["path"] for c in report["final"].get("live", []) if c.get("match") is False]
    bad += (report.get("live_replies") or {}).get("differing", [])
    return bad


def _print_replay(report: dict[str, Any]) -> None:
    final = report["final"]
    table = Table(title=f"replay of {escape(report['model_id'])}", title_justify="left", show_edge=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("events", f"{report['records_read']} read, {report['events_fed']} of the model, "
                            f"{report['events_applied']} applied")
    table.add_row("optimizer steps", f"{report['steps_applied']} applied, model at step {final['step']} "
                                     f"(seq_id {final['last_seq_id']})")
    if report["from_snapshot"]:
        table.add_row("started from", f"auto-snapshot at seq_id {report['from_snapshot']['seq_id']}")
    if report["steps"]:
        last = report["steps"][-1]
        table.add_row("last step loss:sum", f"{last['loss:sum']:.6g}")
    table.add_row("sha256", final.get("sha256", "(unloaded)"))
    for entry in report["checkpoints"]:
        mark = {True: "[green]✓ same as live[/]", False: "[red]✗ differs from live[/]"}.get(
            entry.get("match"), f"[dim]not compared ({escape(entry.get('live_missing', ''))})[/]")
        table.add_row(f"step {entry['step']} save", f"{escape(entry['path'])}  {mark}")
    snapshot = report.get("live_snapshot")
    if snapshot is not None:
        same = any(c["path"] == snapshot["path"] and c.get("match") for c in final.get("live", []))
        note = "[green]✓ same weights[/]" if same else f"[dim](at step {snapshot['step']})[/]"
        table.add_row("live snapshot", f"step {snapshot['step']} {note}")
    replies = report.get("live_replies")
    if replies:
        colour = "green" if not replies["differing"] else "red"
        table.add_row("live replies", f"[{colour}]{replies['identical']} of {replies['compared']} identical[/]")
    table.add_row("output", f"{escape(str(final.get('adapter_dir', report['source'])))} (report.json)")
    stdout.print(table)


# ---------------------------------------------------------------------- export-log


def cmd_export_log(args: argparse.Namespace) -> int:
    from tinker_bus.args import UsageError, settings_from_args

    if not (args.model_id or args.session_id):
        raise UsageError("export-log needs --model-id or --session-id")
    settings = settings_from_args(args)
    _quiet_logs()
    out = Path(args.out)
    with _LiveProgress("records read", "records exported") as progress:
        count = asyncio.run(export_log(settings, out, args.model_id or [], args.session_id or [],
                                       with_replies=not args.no_replies, idle_timeout_s=args.idle_timeout,
                                       progress=progress))
    names = escape(", ".join(args.model_id or args.session_id))
    stdout.print(f" [green]✓[/] {count} records of {names} → {escape(str(out))}")
    return 0


async def export_log(settings: Any, out: Path, model_ids: list[str], session_ids: list[str], *,
                     with_replies: bool = True, idle_timeout_s: float = 10.0,
                     progress: _LiveProgress | None = None) -> int:
    """Write the models' training events (and their replies) to `out`; returns the number of records."""
    from bus_runtime.log_reader import model_key_filter, read_bus
    from trainer_consumer.replay.event_log import (
        claim_check_body,
        write_header,
        write_record,
    )

    objects = _objects(settings)
    topics = {"train": settings.topics.train, "replies": settings.topics.replies if with_replies else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    count = 0
    with partial.open("wb") as fh:
        write_header(fh, topics=topics, model_ids=model_ids, session_ids=session_ids,
                     source={"kafka": settings.kafka_bootstrap, "bucket": settings.bucket})
        async for record in read_bus(settings, [t for t in topics.values() if t], model_key_filter(model_ids,
                                                                                                   session_ids),
                                     idle_timeout_s=idle_timeout_s, progress=progress.read if progress else None):
            claim = await asyncio.to_thread(claim_check_body, record.value, objects)
            write_record(fh, replace(record, claim=claim))
            count += 1
            if progress is not None:
                progress.exported(count)
    os.replace(partial, out)
    return count


def _quiet_logs() -> None:
    # The progress lines are the output; per-model INFO lines of the engine would only interleave with them.
    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))


def _objects(settings: Any) -> Any:

    return open_object_store(settings)


# ---------------------------------------------------------------------- parser


def add_log_commands(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register `replay` and `export-log` on the `tinker-bus` parser's subparsers."""
    from tinker_bus.args import bus_options  # the same bus / storage flags as every other command

    replay = subparsers.add_parser(
        "replay", parents=[common_parent],
        help="rebuild a model from the event log; write its adapter and a report comparing it with the live run")
    replay.add_argument("--model-id", required=True, help="the model (training run id) to rebuild")
    replay.add_argument("--out", required=True, metavar="DIR", help="where the adapter and report.json go")
    replay.add_argument("--until-seq", type=int, metavar="N", help="apply the model's events up to seq_id N only")
    replay.add_argument("--from-snapshot", action="store_true",
                        help="start from the model's live auto-snapshot instead of from scratch")
    replay.add_argument("--from-file", metavar="LOG", help="read the events from an export-log file, not the broker")
    replay.add_argument("--offline", action="store_true", help="no S3 at all (with --from-file on another machine)")
    replay.add_argument("--no-live", action="store_true", help="do not compare results with the live replies")
    replay.add_argument("--threads", type=int, help="torch CPU threads (bit-identical weights need the live "
                                                    "trainer's count; default $TINKER_BUS_TRAINER_TORCH_THREADS)")
    replay.add_argument("--idle-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="stop reading the broker after this long without data (default 10)")
    bus_options(replay, for_up=False)
    replay.set_defaults(func=cmd_replay)

    export = subparsers.add_parser("export-log", parents=[common_parent],
                                   help="write a model's or a session's events to a file that replay accepts")
    export.add_argument("--model-id", action="append", help="a model to export (repeatable)")
    export.add_argument("--session-id", action="append", help="every training model of this session (repeatable)")
    export.add_argument("--out", required=True, metavar="FILE", help="the export file (msgpack stream)")
    export.add_argument("--no-replies", action="store_true", help="leave the live replies out")
    export.add_argument("--idle-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="stop reading the broker after this long without data (default 10)")
    bus_options(export, for_up=False)
    export.set_defaults(func=cmd_export_log)
