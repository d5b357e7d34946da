"""S3 / MinIO through the `minio` client: the one place that talks to object storage."""

from __future__ import annotations

import io
from collections.abc import Iterator

from minio import Minio
from minio.error import S3Error

from tinker_bus.settings import BusSettings

MISSING_KEY_CODES = ("NoSuchKey", "NoSuchObject", "NotFound")


class ObjectStore:
    """A bucket of immutable-by-convention objects. Implements bus_events.BlobStore for claim checks."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False):
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure)
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: BusSettings) -> ObjectStore:
        return cls(settings.s3_endpoint, settings.s3_access_key, settings.s3_secret_key, settings.bucket,
                   settings.s3_secure)

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def get_bytes(self, key: str) -> bytes:
        resp = self.client.get_object(self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_bytes_or_none(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such key (one request, no exists() race)."""
        try:
            return self.get_bytes(key)
        except S3Error as exc:
            if exc.code in MISSING_KEY_CODES:
                return None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in MISSING_KEY_CODES:
                return False
            raise

    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=recursive):
            yield obj.object_name

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_keys(prefix))
        for key in keys:
            self.client.remove_object(self.bucket, key)
        return len(keys)

    def ping(self) -> bool:
        try:
            self.client.bucket_exists(self.bucket)
            return True
        except Exception:
            return False

    # bus_events.BlobStore
    put_blob = put_bytes
    get_blob = get_bytes
