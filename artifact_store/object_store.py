"""Object storage behind one small Protocol: S3 / MinIO through the `minio` client, and an in-memory bucket.

Everything above (checkpoints, registry, claim checks, heartbeats) talks to an `ObjectStore`; only
`MinioObjectStore` knows S3. `MemoryObjectStore` is the same contract in a dict: engine tests and replay
sandboxes run on it without a server.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO, Protocol, cast, runtime_checkable

from minio import Minio
from minio.commonconfig import CopySource
from minio.error import S3Error

MISSING_KEY_CODES = ("NoSuchKey", "NoSuchObject", "NotFound")


@dataclass(frozen=True)
class S3Config:
    """Where a bucket lives and how to reach it (storage's own connection config: no bus settings here)."""

    endpoint: str = "127.0.0.1:9000"
    access_key: str = "minioadmin"
    secret_key: str = "minioadmin"
    bucket: str = "tinker-bus"
    secure: bool = False


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket of immutable-by-convention objects. Also a bus_events.BlobStore (put_blob / get_blob)."""

    bucket: str

    def ensure_bucket(self) -> None: ...
    def put_bytes(self, key: str, data: bytes | memoryview, content_type: str = "application/octet-stream") -> None:
        ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_bytes_or_none(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key (one request, no exists() race)."""
        ...
    def exists(self, key: str) -> bool: ...
    def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes piece by piece (FileNotFoundError if there is none): a download streams, it does not
        hold a whole adapter in memory."""
        ...
    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy: the bytes never leave the store."""
        ...
    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presigned_url(self, key: str, expires_s: int = 3600) -> str: ...
    def ping(self) -> bool: ...
    def put_blob(self, key: str, data: bytes) -> None: ...
    def get_blob(self, key: str) -> bytes: ...


class _PartReader:
    """Reads a memoryview part by part: BytesIO would copy all of it at once, holding the GIL meanwhile (a
    snapshot's optimizer file is hundreds of MB); minio reads one part (>= 5 MiB) at a time and needs bytes."""

    def __init__(self, data: memoryview):
        self._data = data.cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else min(len(self._data), self._pos + size)
        chunk = bytes(self._data[self._pos:end])
        self._pos = end
        return chunk


class MinioObjectStore:
    """An S3 / MinIO bucket: the one class that talks to object storage over the network."""

    def __init__(self, config: S3Config):
        self._client = Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                             secure=config.secure)
        self.bucket = config.bucket

    def ensure_bucket(self) -> None:
        if not self._client.bucket_exists(self.bucket):
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key: str, data: bytes | memoryview, content_type: str = "application/octet-stream") -> None:
        stream = io.BytesIO(data) if isinstance(data, bytes) else cast(BinaryIO, _PartReader(data))
        self._client.put_object(self.bucket, key, stream, len(data), content_type=content_type)

    def get_bytes(self, key: str) -> bytes:
        resp = self._client.get_object(self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_bytes_or_none(self, key: str) -> bytes | None:
        try:
            return self.get_bytes(key)
        except S3Error as exc:
            if exc.code in MISSING_KEY_CODES:
                return None
            raise

    def exists(self, key: str) -> bool:
        try:
            self._client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in MISSING_KEY_CODES:
                return False
            raise

    def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        try:
            resp = self._client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in MISSING_KEY_CODES:
                raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
            raise
        try:
            yield from resp.stream(chunk_bytes)
        finally:
            resp.close()
            resp.release_conn()

    def copy(self, src_key: str, dst_key: str) -> None:
        self._client.copy_object(self.bucket, dst_key, CopySource(self.bucket, src_key))

    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]:
        for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=recursive):
            if obj.object_name is not None:
                yield obj.object_name

    def delete(self, key: str) -> None:
        self._client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_keys(prefix))
        for key in keys:
            self._client.remove_object(self.bucket, key)
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self._client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=expires_s))

    def ping(self) -> bool:
        try:
            self._client.bucket_exists(self.bucket)
            return True
        except Exception:
            return False

    put_blob = put_bytes
    get_blob = get_bytes


class MemoryObjectStore:
    """A bucket in a dict, safe to share between threads. Optionally reads through to a `base` store for keys it
    has never written or deleted, except keys under a `private` prefix (what a replay sandbox needs: a replayed
    model sees its own checkpoints, never the live ones, and no write reaches the live bucket)."""

    def __init__(self, bucket: str = "memory", base: ObjectStore | None = None, private: tuple[str, ...] = ()):
        self.bucket = base.bucket if base is not None else bucket
        self.base = base
        self.private = private
        self._written: dict[str, bytes] = {}
        self._deleted: set[str] = set()
        self._lock = threading.Lock()

    def _from_base(self, key: str) -> bool:
        return self.base is not None and key not in self._deleted and not key.startswith(self.private)

    def ensure_bucket(self) -> None:
        pass

    def put_bytes(self, key: str, data: bytes | memoryview, content_type: str = "application/octet-stream") -> None:
        with self._lock:
            self._written[key] = bytes(data)
            self._deleted.discard(key)

    def get_bytes_or_none(self, key: str) -> bytes | None:
        with self._lock:
            if key in self._written:
                return self._written[key]
            from_base = self._from_base(key)
        return self.base.get_bytes_or_none(key) if from_base and self.base is not None else None

    def get_bytes(self, key: str) -> bytes:
        data = self.get_bytes_or_none(key)
        if data is None:
            raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}")
        return data

    def exists(self, key: str) -> bool:
        return self.get_bytes_or_none(key) is not None

    def read_chunks(self, key: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        data = memoryview(self.get_bytes(key))
        for start in range(0, len(data), chunk_bytes):
            yield bytes(data[start:start + chunk_bytes])

    def copy(self, src_key: str, dst_key: str) -> None:
        self.put_bytes(dst_key, self.get_bytes(src_key))

    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]:
        with self._lock:
            keys = {k for k in self._written if k.startswith(prefix)}
        if not recursive:  # S3 semantics: one level below the prefix, folders as "name/"
            keys = {prefix + k[len(prefix):].split("/", 1)[0] + ("/" if "/" in k[len(prefix):] else "")
                    for k in keys}
        if self.base is not None and not prefix.startswith(self.private):
            keys |= {k for k in self.base.list_keys(prefix, recursive) if self._from_base(k)}
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        with self._lock:
            self._written.pop(key, None)
            self._deleted.add(key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_keys(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        if self.base is not None and self._from_base(key):
            return self.base.presigned_url(key, expires_s)
        return f"memory://{self.bucket}/{key}"

    def ping(self) -> bool:
        return True

    put_blob = put_bytes
    get_blob = get_bytes
