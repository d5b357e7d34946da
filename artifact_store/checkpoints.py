"""Checkpoints in S3: PEFT-format sampler weights and full training state, written atomically.

Layout of one checkpoint at tinker://<run>/<kind>/<name> (S3 prefix runs/<run>/<kind>/<name>/):

Kinds: weights (training state), sampler_weights and external_weights (a PEFT adapter only: what samplers load,
and what `tinker checkpoint download` hands out).

    v-<uuid>/adapter_config.json          PEFT LoRA config
    v-<uuid>/adapter_model.safetensors    PEFT adapter weights
    v-<uuid>/optimizer.safetensors        training state only: AdamW moments, keyed by parameter name
    v-<uuid>/state.json                   training state only: step, optimizer hyper-parameters, bus offsets
    manifest.json                         written last: version, sha256 + size of each file, expiry

A reader resolves manifest.json first and verifies every file against it, so a crash in the middle of a
save leaves either the previous checkpoint or nothing listed; never half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load on first (de)serialisation: the gateway imports no torch
    import torch

from artifact_store.flat_tensors import FlatTensors
from artifact_store.object_store import ObjectStore
from artifact_store.paths import CHECKPOINT_TYPES, InvalidPath, TinkerPath, run_prefix
from artifact_store.publication import Publications

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
# A concurrent overwrite may replace the version a reader resolved; the reader retries with the new manifest.
READ_ATTEMPTS = 3


class CheckpointExists(FileExistsError):
    pass


class CheckpointNotFound(FileNotFoundError):
    pass


class CheckpointCorrupt(RuntimeError):
    pass


@dataclass
class Checkpoint:
    """What a save writes and a load returns. Tensors are CPU tensors keyed by PEFT parameter name."""

    adapter_config: dict[str, Any]
    adapter_weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    path: TinkerPath
    created_at: float
    size_bytes: int
    expires_at: float | None
    user_metadata: dict[str, str]
    base_model: str
    # The manifest version: changes on every save, so (path, version) names one immutable set of weights.
    version: str = ""
    public: bool = False  # filled only where asked for (list_run, info(with_public=True)): it costs a request
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes

    def as_tinker_json(self) -> dict[str, Any]:
        """The SDK's Checkpoint shape (tinker-protocol.md 2.5)."""
        out: dict[str, Any] = {
            "checkpoint_id": self.path.checkpoint_id,
            "checkpoint_type": CHECKPOINT_TYPES[self.path.kind],
            "time": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
            "tinker_path": str(self.path),
            "size_bytes": self.size_bytes,
            "public": self.public,
            "base_model": self.base_model,  # SDK 0.39's Checkpoint.base_model; older SDKs ignore it
        }
        if self.user_metadata:
            out["user_metadata"] = self.user_metadata
        if self.expires_at is not None:
            out["expires_at"] = datetime.fromtimestamp(self.expires_at, UTC).isoformat()
        return out


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _st_save(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _st_load(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _safetensors_file(tensors: dict[str, torch.Tensor]) -> bytes | memoryview:
    """A FlatTensors already is the file (no serialisation pass, no copy); anything else is serialised."""
    if isinstance(tensors, FlatTensors):
        return tensors.file()
    return _st_save(_contiguous(tensors))


def _json_default(value: Any) -> Any:
    """PEFT configs hold sets (target_modules) and str enums (peft_type); PEFT's own save does the same."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"adapter_config value {value!r} ({type(value).__name__}) is not JSON serialisable")


class CheckpointStore:
    def __init__(self, objects: ObjectStore):
        self.objects = objects
        self.publications = Publications(objects)

    # ------------------------------------------------------------------ write
    def save(
        self,
        path: TinkerPath,
        ckpt: Checkpoint,
        *,
        base_model: str,
        overwrite: bool = False,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointInfo:
        files: dict[str, bytes | memoryview] = {
            ADAPTER_CONFIG: json.dumps(ckpt.adapter_config, sort_keys=True, indent=1, default=_json_default).encode(),
            ADAPTER_WEIGHTS: _safetensors_file(ckpt.adapter_weights),
        }
        if path.kind == "weights":
            files[OPTIMIZER] = _safetensors_file(ckpt.optimizer_state or {})
            files[STATE] = json.dumps(ckpt.state, sort_keys=True).encode()
        return self.save_files(path, files, base_model=base_model, overwrite=overwrite, ttl_seconds=ttl_seconds,
                               user_metadata=user_metadata)

    def save_files(
        self,
        path: TinkerPath,
        files: dict[str, bytes | memoryview],
        *,
        base_model: str,
        overwrite: bool = False,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointInfo:
        """Write `files` as a new version of `path`, then its manifest (the commit point)."""
        if not overwrite and self._manifest(path) is not None:
            raise CheckpointExists(f"{path} already exists (pass overwrite=True to replace it)")
        version = f"v-{uuid.uuid4().hex[:12]}"
        for name, data in files.items():
            self.objects.put_bytes(f"{path.prefix}{version}/{name}", data)
        meta = {name: {"sha256": _sha(data), "size": len(data)} for name, data in files.items()}
        return self._commit(path, version, meta, base_model=base_model, ttl_seconds=ttl_seconds,
                            user_metadata=user_metadata)

    def _commit(self, path: TinkerPath, version: str, files: dict[str, dict[str, Any]], *, base_model: str,
                ttl_seconds: int | None, user_metadata: dict[str, str] | None) -> CheckpointInfo:
        """Publish the manifest of `version` (whose files are in place), then drop the version it replaces."""
        now = time.time()
        manifest = {
            "format": 1,
            "tinker_path": str(path),
            "version": version,
            "base_model": base_model,
            "created_at": now,
            "expires_at": now + ttl_seconds if ttl_seconds else None,
            "user_metadata": user_metadata or {},
            "files": files,
        }
        previous = self._manifest(path, include_expired=True)
        self.objects.put_bytes(f"{path.prefix}{MANIFEST}", json.dumps(manifest, indent=1).encode(),
                               "application/json")
        if previous is not None and previous["version"] != version:
            self.objects.delete_prefix(f"{path.prefix}{previous['version']}/")
        return self._info(path, manifest)

    # ------------------------------------------------------------------ read
    def _manifest(self, path: TinkerPath, include_expired: bool = False) -> dict[str, Any] | None:
        # One GET, no exists() first: a delete between the two calls would surface as an S3 error.
        data = self.objects.get_bytes_or_none(f"{path.prefix}{MANIFEST}")
        if data is None:
            return None
        manifest = json.loads(data)
        if not include_expired and manifest.get("expires_at") and manifest["expires_at"] < time.time():
            return None
        return manifest

    def _info(self, path: TinkerPath, manifest: dict[str, Any], public: bool = False) -> CheckpointInfo:
        return CheckpointInfo(
            path=path,
            created_at=manifest["created_at"],
            size_bytes=sum(f["size"] for f in manifest["files"].values()),
            expires_at=manifest.get("expires_at"),
            user_metadata=manifest.get("user_metadata", {}),
            base_model=manifest["base_model"],
            version=manifest["version"],
            public=public,
            files={name: meta["size"] for name, meta in manifest["files"].items()},
        )

    def info(self, path: TinkerPath, with_public: bool = False) -> CheckpointInfo:
        manifest = self._manifest(path)
        if manifest is None:
            raise CheckpointNotFound(f"no checkpoint at {path}")
        return self._info(path, manifest, with_public and self.publications.is_public(path))

    def _read_verified(self, path: TinkerPath, only: tuple[str, ...] | None = None
                       ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The manifest and the files it lists (or `only` those), each checked against its sha256.

        An overwrite deletes the previous version's files right after publishing its manifest, so a reader
        that resolved the old manifest may find files gone or replaced: it re-reads the manifest and retries.
        """
        for _ in range(READ_ATTEMPTS):
            manifest = self._manifest(path)
            if manifest is None:
                raise CheckpointNotFound(f"no checkpoint at {path}")
            out: dict[str, bytes] = {}
            problem = None
            for name, meta in manifest["files"].items():
                if only is not None and name not in only:
                    continue
                data = self.objects.get_bytes_or_none(f"{path.prefix}{manifest['version']}/{name}")
                if data is None:
                    problem = f"{name} is missing"
                    break
                if len(data) != meta["size"] or _sha(data) != meta["sha256"]:
                    problem = f"{name} does not match its manifest checksum"
                    break
                out[name] = data
            if problem is None:
                return manifest, out
            current = self._manifest(path)
            if current is None or current["version"] == manifest["version"]:
                raise CheckpointCorrupt(f"{path} (version {manifest['version']}): {problem}")
        raise CheckpointCorrupt(f"{path}: rewritten {READ_ATTEMPTS} times while being read")

    def read_files(self, path: TinkerPath) -> dict[str, bytes]:
        """Every file of the checkpoint, each verified against the manifest."""
        return self._read_verified(path)[1]

    def load(self, path: TinkerPath) -> Checkpoint:
        return self.load_with_info(path)[0]

    def load_with_info(self, path: TinkerPath) -> tuple[Checkpoint, CheckpointInfo]:
        """The checkpoint and the info (incl. manifest version) of exactly the files that were loaded."""
        manifest, files = self._read_verified(path)
        ckpt = Checkpoint(
            adapter_config=json.loads(files[ADAPTER_CONFIG]),
            adapter_weights=_st_load(files[ADAPTER_WEIGHTS]),
            optimizer_state=_st_load(files[OPTIMIZER]) if OPTIMIZER in files else None,
            state=json.loads(files[STATE]) if STATE in files else {},
        )
        return ckpt, self._info(path, manifest)

    def download(self, path: TinkerPath, dest: Path) -> Path:
        """Write the checkpoint's files into `dest` (a folder PeftModel.from_pretrained loads as is)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.read_files(path).items():
            (dest / name).write_bytes(data)
        return dest

    def list_run(self, run_id: str) -> list[CheckpointInfo]:
        infos = []
        public = self.publications.published(run_id)
        for key in self.objects.list_keys(run_prefix(run_id)):
            if not key.endswith(f"/{MANIFEST}"):
                continue
            _, run, kind, name, _ = key.split("/", 4)
            try:
                path = TinkerPath(run, kind, name)  # type: ignore[arg-type]
            except InvalidPath:
                continue
            if kind not in CHECKPOINT_TYPES:
                continue
            manifest = self._manifest(path, include_expired=True)
            if manifest is None:
                continue  # deleted since it was listed
            if manifest.get("expires_at") and manifest["expires_at"] < time.time():
                self._sweep_expired(path, manifest["version"])
                continue
            infos.append(self._info(path, manifest, path in public))
        return sorted(infos, key=lambda i: i.created_at)

    def _sweep_expired(self, path: TinkerPath, version: str) -> None:
        """Delete an expired checkpoint, unless a save replaced it since we looked."""
        current = self._manifest(path, include_expired=True)
        if current is not None and current["version"] == version and current.get("expires_at") \
                and current["expires_at"] < time.time():
            self.delete(path)

    def set_ttl(self, path: TinkerPath, ttl_seconds: int | None) -> None:
        manifest = self._manifest(path)
        if manifest is None:
            raise CheckpointNotFound(f"no checkpoint at {path}")
        manifest["expires_at"] = time.time() + ttl_seconds if ttl_seconds else None
        self.objects.put_bytes(f"{path.prefix}{MANIFEST}", json.dumps(manifest, indent=1).encode(),
                               "application/json")

    def copy(self, src: TinkerPath, dst: TinkerPath, *, ttl_seconds: int | None = None) -> CheckpointInfo:
        """A new checkpoint at `dst` with `src`'s files, copied inside the store (no byte passes through us).
        Overwrites `dst`: a retried copy lands on the same path with the same bytes. The source's expiry is not
        inherited."""
        manifest = self._manifest(src)
        if manifest is None:
            raise CheckpointNotFound(f"no checkpoint at {src}")
        version = f"v-{uuid.uuid4().hex[:12]}"
        for name in manifest["files"]:
            self.objects.copy(f"{src.prefix}{manifest['version']}/{name}", f"{dst.prefix}{version}/{name}")
        return self._commit(dst, version, manifest["files"], base_model=manifest["base_model"],
                            ttl_seconds=ttl_seconds, user_metadata=manifest.get("user_metadata"))

    def file_key(self, info: CheckpointInfo, name: str) -> str:
        """The object key of one file of exactly the version `info` describes."""
        if name not in info.files:
            raise CheckpointNotFound(f"{info.path} has no file {name!r}")
        return f"{info.path.prefix}{info.version}/{name}"

    def delete(self, path: TinkerPath) -> bool:
        """Manifest first, so the checkpoint disappears atomically; then its publication and its files."""
        key = f"{path.prefix}{MANIFEST}"
        existed = self.objects.exists(key)
        if existed:
            self.objects.delete(key)
        self.publications.unpublish(path)
        self.objects.delete_prefix(path.prefix)
        return existed
