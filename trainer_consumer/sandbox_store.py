"""An ObjectStore that reads through to another one and keeps every write in memory: what a replay runs on, so
re-applying a run's saves, registrations and ephemeral snapshots never touches the live bucket."""

from __future__ import annotations

from collections.abc import Iterator

from artifact_store import ObjectStore


class SandboxStore(ObjectStore):
    """Reads: this sandbox's own writes first, then `base` (None: nothing underneath, fully offline). Keys under a
    `private` prefix are never read from `base` (a replayed model sees its own checkpoints, not the live ones)."""

    def __init__(self, base: ObjectStore | None, private: tuple[str, ...] = ()):  # no super().__init__: no client
        self.base = base
        self.bucket = base.bucket if base is not None else "sandbox"
        self.private = private
        self._written: dict[str, bytes] = {}
        self._deleted: set[str] = set()

    def _from_base(self, key: str) -> bool:
        return self.base is not None and key not in self._deleted and not key.startswith(self.private)

    def ensure_bucket(self) -> None:
        pass

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._written[key] = bytes(data)
        self._deleted.discard(key)

    def get_bytes_or_none(self, key: str) -> bytes | None:
        if key in self._written:
            return self._written[key]
        return self.base.get_bytes_or_none(key) if self._from_base(key) else None  # type: ignore[union-attr]

    def get_bytes(self, key: str) -> bytes:
        data = self.get_bytes_or_none(key)
        if data is None:
            raise FileNotFoundError(f"no object {key!r}")
        return data

    def exists(self, key: str) -> bool:
        return self.get_bytes_or_none(key) is not None

    def list_keys(self, prefix: str, recursive: bool = True) -> Iterator[str]:
        keys = {k for k in self._written if k.startswith(prefix)}
        if self.base is not None and not prefix.startswith(self.private):
            keys |= {k for k in self.base.list_keys(prefix, recursive) if self._from_base(k)}
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        self._written.pop(key, None)
        self._deleted.add(key)

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list_keys(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    def ping(self) -> bool:
        return True

    put_blob = put_bytes
    get_blob = get_bytes
