"""Automatic snapshots: one model's training state in S3, written by the trainer for its own recovery.

    runs/<model_id>/snapshots/latest/      a CheckpointStore checkpoint: adapter_config.json,
                                           adapter_model.safetensors, optimizer.safetensors (AdamW moments) and
                                           state.json (ModelState record + the DurablePoint it covers)
    runs/<model_id>/snapshots/progress.json  {"snapshot_version", "point"}: the snapshot is still exact up to
                                           this later point (events since then changed nothing that lasts)

Each save replaces the previous one atomically (manifest written last, see artifact_store.checkpoints). They sit
beside the run's checkpoints but under the `snapshots` kind, which no tinker:// path can name: the gateway's
listings (CheckpointStore.list_run keeps only `weights` and `sampler_weights`) never show them, and no client can
load, overwrite or delete them by name. A model that was unloaded gets a snapshot without tensors (a tombstone).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from artifact_store import Checkpoint, CheckpointNotFound, CheckpointStore, ObjectStore, TinkerPath
from trainer_consumer.durability import DurablePoint
from trainer_consumer.state_record import StateFormatError, TrainingStateRecord, read_state

SNAPSHOT_NAME = "latest"


@dataclass(frozen=True)
class SnapshotPath(TinkerPath):
    """A TinkerPath for the CheckpointStore's machinery (kind "weights": the training-state file set), stored
    under runs/<model>/snapshots/ instead of runs/<model>/weights/."""

    @property
    def prefix(self) -> str:
        return f"runs/{self.run_id}/snapshots/{self.name}/"

    def __str__(self) -> str:
        return f"snapshot://{self.run_id}/{self.name}"


def snapshot_path(model_id: str) -> SnapshotPath:
    return SnapshotPath(model_id, "weights", SNAPSHOT_NAME)


def _progress_key(model_id: str) -> str:
    return f"runs/{model_id}/snapshots/progress.json"


class Progress(msgspec.Struct):
    """progress.json: the snapshot of this manifest version is still exact up to `point`."""

    snapshot_version: str
    point: DurablePoint


@dataclass(frozen=True)
class Snapshot:
    checkpoint: Checkpoint
    record: TrainingStateRecord
    version: str  # the manifest version: which save this is
    point: DurablePoint  # the snapshot's own point, advanced by its progress marker when that matches


class SnapshotStore:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self.checkpoints = CheckpointStore(objects)

    def save(self, model_id: str, checkpoint: Checkpoint, record: TrainingStateRecord, point: DurablePoint) -> str:
        """Write the snapshot (replacing the previous one), its record saying which point it covers; returns its
        version."""
        checkpoint.state = msgspec.structs.replace(record, durable_point=point).to_json()
        return self.checkpoints.save(snapshot_path(model_id), checkpoint, base_model=record.base_model,
                                     overwrite=True).version

    def save_progress(self, model_id: str, snapshot_version: str, point: DurablePoint) -> None:
        self.objects.put_bytes(_progress_key(model_id), msgspec.json.encode(Progress(snapshot_version, point)),
                               "application/json")

    def load(self, model_id: str) -> Snapshot | None:
        try:
            checkpoint, info = self.checkpoints.load_with_info(snapshot_path(model_id))
        except CheckpointNotFound:
            return None
        record = read_state(checkpoint.state)
        if record is None:
            raise StateFormatError(f"the snapshot of {model_id} has no state.json")
        point = record.durable_point or DurablePoint()
        raw = self.objects.get_bytes_or_none(_progress_key(model_id))
        if raw is not None:
            progress = msgspec.json.decode(raw, type=Progress)
            # A marker of an older snapshot (or a newer one whose manifest lost a race) says nothing about this one.
            if progress.snapshot_version == info.version:
                point = progress.point
        return Snapshot(checkpoint, record, info.version, point)
