"""Checkpoints, run metadata and claim-checked payloads in S3 / MinIO, addressed by tinker:// paths."""

from artifact_store.checkpoints import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointExists,
    CheckpointInfo,
    CheckpointNotFound,
    CheckpointStore,
)
from artifact_store.object_store import MemoryObjectStore, MinioObjectStore, ObjectStore, S3Config
from artifact_store.paths import InvalidPath, TinkerPath, check_name
from artifact_store.registry import Registry, SamplingSession, Session, TrainingRun

__all__ = [
    "Checkpoint",
    "CheckpointCorrupt",
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointStore",
    "InvalidPath",
    "MemoryObjectStore",
    "MinioObjectStore",
    "ObjectStore",
    "Registry",
    "S3Config",
    "SamplingSession",
    "Session",
    "TinkerPath",
    "TrainingRun",
    "check_name",
]
