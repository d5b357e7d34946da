"""Uploads of PEFT LoRA adapters trained elsewhere: staged file by file, checked, then committed as an
external_weights checkpoint (the storage side of SDK 0.39's external_weights_upload_start / _finish).

    uploads/<upload_id>/upload.json       who started it, for which tinker:// path and base model, until when
    uploads/<upload_id>/<file>            the staged files (adapter_config.json, adapter_model.safetensors)
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from artifact_store.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointInfo, CheckpointStore
from artifact_store.paths import TinkerPath

UPLOAD_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_PREFIX = "uploads/"


class InvalidUpload(ValueError):
    pass


@dataclass(frozen=True)
class Upload:
    upload_id: str
    tenant: str
    tinker_path: str
    base_model: str
    expires_at: float  # staged files are accepted (and the upload finished) until then
    ttl_seconds: int | None = None  # of the committed checkpoint


def check_adapter_config(data: bytes) -> dict[str, Any]:
    """A PEFT LoRA adapter_config.json: a JSON object with an int rank `r` and a list of target modules."""
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise InvalidUpload(f"{ADAPTER_CONFIG} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidUpload(f"{ADAPTER_CONFIG} must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidUpload(f"{ADAPTER_CONFIG}: peft_type must be LORA, got {config.get('peft_type')!r}")
    if not isinstance(config.get("r"), int) or isinstance(config.get("r"), bool):
        raise InvalidUpload(f"{ADAPTER_CONFIG}: r (the LoRA rank) must be an integer, got {config.get('r')!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidUpload(f"{ADAPTER_CONFIG}: target_modules must be a non-empty list of module names")
    return config


def check_safetensors(data: bytes) -> None:
    """The safetensors layout: an 8-byte header length, a JSON header whose tensors lie inside the file."""
    if len(data) < 8:
        raise InvalidUpload(f"{ADAPTER_WEIGHTS} is {len(data)} bytes: not a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise InvalidUpload(f"{ADAPTER_WEIGHTS}: its header runs past the end of the file")
    try:
        header = json.loads(data[8:8 + size])
        ends = [meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise InvalidUpload(f"{ADAPTER_WEIGHTS}: unreadable safetensors header ({exc})") from exc
    if not ends or max(ends) > len(data) - 8 - size:
        raise InvalidUpload(f"{ADAPTER_WEIGHTS}: no tensors, or tensors past the end of the file")


class Uploads:
    def __init__(self, checkpoints: CheckpointStore):
        self.checkpoints = checkpoints
        self.objects = checkpoints.objects

    @staticmethod
    def staged_key(upload_id: str, file: str) -> str:
        if file not in UPLOAD_FILES:
            raise InvalidUpload(f"{file!r} is not part of a LoRA adapter upload ({', '.join(UPLOAD_FILES)})")
        return f"{_PREFIX}{upload_id}/{file}"

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def start(self, upload_id: str, tenant: str, path: TinkerPath, base_model: str, expires_at: float,
              ttl_seconds: int | None = None) -> Upload:
        upload = Upload(upload_id=upload_id, tenant=tenant, tinker_path=str(path), base_model=base_model,
                        expires_at=expires_at, ttl_seconds=ttl_seconds)
        self.objects.put_bytes(f"{_PREFIX}{upload.upload_id}/upload.json", json.dumps(asdict(upload)).encode(),
                               "application/json")
        return upload

    def get(self, upload_id: str) -> Upload | None:
        """The upload, or None if there is none or it expired."""
        data = self.objects.get_bytes_or_none(f"{_PREFIX}{upload_id}/upload.json")
        upload = Upload(**json.loads(data)) if data is not None else None
        return upload if upload is not None and upload.expires_at >= time.time() else None

    def staged(self, upload: Upload) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The staged files, checked, and the adapter config (InvalidUpload names what is wrong)."""
        files = {}
        for file in UPLOAD_FILES:
            data = self.objects.get_bytes_or_none(self.staged_key(upload.upload_id, file))
            if data is None:
                raise InvalidUpload(f"{file} was not uploaded (PUT it to its URL from upload_start)")
            files[file] = data
        config = check_adapter_config(files[ADAPTER_CONFIG])
        check_safetensors(files[ADAPTER_WEIGHTS])
        return files, config

    def commit(self, upload: Upload, files: dict[str, bytes]) -> CheckpointInfo:
        """The staged files as the checkpoint; the staging area is dropped. The path is this upload's alone, so a
        retried commit (after a crash before the drop) rewrites the same files."""
        info = self.checkpoints.save_files(TinkerPath.parse(upload.tinker_path), dict(files), overwrite=True,
                                           base_model=upload.base_model, ttl_seconds=upload.ttl_seconds)
        self.objects.delete_prefix(f"{_PREFIX}{upload.upload_id}/")
        return info
