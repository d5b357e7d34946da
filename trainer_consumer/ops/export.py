"""export_model: a checkpoint's LoRA merged into its base model (trainer_consumer.export), uploaded next to the
run's checkpoints, answered with presigned download URLs.

It works from the checkpoint in S3, not the live adapter, so it needs no seq_id and no loaded model; it runs on an
I/O thread (the merge holds one base shard at a time), so the compute thread keeps training meanwhile. Applied
again after a crash it rewrites the same files: harmless.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from artifact_store import CheckpointNotFound, InvalidPath, ObjectStore, TinkerPath
from artifact_store.paths import run_prefix
from bus_events import payloads as p
from bus_runtime.errors import UserError
from trainer_consumer.export import MergeError, export_checkpoint
from trainer_consumer.inbound import Inbound
from trainer_consumer.runtime import Runtime
from trainer_consumer.stream import ModelStream

# Presigned S3 URLs live at most 7 days (SigV4).
MAX_URL_TTL_S = 7 * 24 * 3600


def export_prefix(path: TinkerPath) -> str:
    return f"{run_prefix(path.run_id)}exports/{path.kind}-{path.name}/"


def _export(rt: Runtime, path: TinkerPath, dtype: str | None, url_ttl_s: int) -> p.ExportResult:
    objects: ObjectStore = rt.storage.checkpoints.objects
    prefix = export_prefix(path)
    with tempfile.TemporaryDirectory(prefix="tinker-bus-export-") as tmp:
        out = Path(tmp) / "model"
        try:
            export_checkpoint(rt.storage.checkpoints, path, out, dtype=dtype)
        except (CheckpointNotFound, MergeError, FileNotFoundError) as exc:
            raise UserError(f"export of {path}: {exc}") from exc
        urls, size = {}, 0
        for file in sorted(out.iterdir()):
            data = file.read_bytes()
            objects.put_bytes(prefix + file.name, data)
            urls[file.name] = objects.presigned_url(prefix + file.name, url_ttl_s)
            size += len(data)
    return p.ExportResult(path=str(path), prefix=prefix, urls=urls, size_bytes=size)


async def export_model(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.ExportModel) -> p.ExportResult:
    try:
        path = TinkerPath.parse(payload.path)
    except InvalidPath as exc:
        raise UserError(f"path: {exc}") from exc
    if path.run_id != inbound.env.model_id:
        raise UserError(f"path {payload.path!r} belongs to run {path.run_id!r}, not to model {inbound.env.model_id!r} "
                        "that the export_model event is keyed by")
    if not 1 <= payload.url_ttl_seconds <= MAX_URL_TTL_S:
        raise UserError(f"url_ttl_seconds must be 1..{MAX_URL_TTL_S}, got {payload.url_ttl_seconds}")
    return await rt.io(_export, rt, path, payload.dtype, payload.url_ttl_seconds)
