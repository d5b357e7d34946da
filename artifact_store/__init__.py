"""Checkpoints and claim-checked payloads in S3 / MinIO, addressed by tinker:// paths."""

from artifact_store.object_store import ObjectStore

__all__ = ["ObjectStore"]
