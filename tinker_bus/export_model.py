"""`tinker-bus export`: merge a checkpoint's LoRA adapter into its base model and write a plain transformers model.

    tinker-bus export --model-path tinker://<run>/sampler_weights/<name> --out DIR [--dtype bfloat16]

The checkpoint is read from the bus's S3 bucket (the usual --s3-* flags / TINKER_BUS_* variables); the base model
is the one named in its adapter_config.json, found like the trainer finds it (local folder, HF cache, packaged),
unless --base-model-dir says where it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stdout = Console(highlight=False, emoji=False)
stderr = Console(stderr=True, highlight=False, emoji=False)


def cmd_export(args: argparse.Namespace) -> int:
    from artifact_store import CheckpointNotFound, CheckpointStore, InvalidPath, TinkerPath
    from bus_runtime.settings import BusSettings, open_object_store
    from tinker_bus.args import UsageError
    from trainer_consumer.export import MergeError, export_checkpoint
    from trainer_consumer.export.checkpoint import DTYPES

    try:
        path = TinkerPath.parse(args.model_path)
    except InvalidPath as exc:
        raise UsageError(f"--model-path: {exc}") from exc
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}")
    overrides = {flag: getattr(args, flag) for flag in ("s3_endpoint", "s3_access_key", "s3_secret_key",
                                                         "s3_secure", "bucket") if getattr(args, flag) is not None}
    checkpoints = CheckpointStore(open_object_store(BusSettings.from_env(**overrides)))
    out = Path(args.out)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=stderr) as progress:
        task = progress.add_task("merging tensors", total=None)

        def report(what: str, done: int, total: int) -> None:
            progress.update(task, description=f"merging {what}", completed=done, total=total)

        try:
            export_checkpoint(checkpoints, path, out, dtype=args.dtype,
                              base_dir=Path(args.base_model_dir) if args.base_model_dir else None, progress=report)
        except (CheckpointNotFound, MergeError, FileNotFoundError) as exc:
            stderr.print(f"[red]export failed:[/] {escape(str(exc))}")
            return 1
    stdout.print(f" [green]✓[/] {escape(str(path))} merged into its base model → {escape(str(out))}")
    return 0


def add_export_command(subparsers: Any, common_parent: argparse.ArgumentParser) -> None:
    """Register `export` on the `tinker-bus` parser's subparsers."""
    export = subparsers.add_parser("export", parents=[common_parent],
                                   help="merge a checkpoint's LoRA into its base model; write a transformers model")
    export.add_argument("--model-path", required=True, metavar="TINKER_PATH",
                        help="tinker://<run>/sampler_weights/<name> (or .../weights/<name>)")
    export.add_argument("--out", required=True, metavar="DIR", help="new folder for safetensors, config, tokenizer")
    export.add_argument("--dtype", help="output weight dtype: bfloat16, float16 or float32 (default: the base's)")
    export.add_argument("--base-model-dir", metavar="DIR", help="the base model's folder, if not found by name")
    g = export.add_argument_group("storage (each defaults to its TINKER_BUS_* variable)")
    g.add_argument("--s3-endpoint", metavar="HOST:PORT")
    g.add_argument("--s3-access-key")
    g.add_argument("--s3-secret-key")
    g.add_argument("--s3-secure", action=argparse.BooleanOptionalAction, default=None, help="HTTPS to S3")
    g.add_argument("--bucket", help="the bucket holding the checkpoints")
    export.set_defaults(func=cmd_export)
