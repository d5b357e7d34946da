"""Published checkpoints: readable by every tenant until unpublished (the SDK's publish / unpublish).

One small object per published checkpoint, public/<run_id>/<kind>/<name>, is the only record of publication:
listing `public/` finds every published checkpoint without reading any tenant's runs, and deleting the object
revokes at once (readers check it on every access, never cache it).
"""

from __future__ import annotations

import json
import time

from artifact_store.object_store import ObjectStore
from artifact_store.paths import CHECKPOINT_TYPES, InvalidPath, TinkerPath

PUBLIC_PREFIX = "public/"


def _key(path: TinkerPath) -> str:
    return f"{PUBLIC_PREFIX}{path.run_id}/{path.kind}/{path.name}"


class Publications:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def publish(self, path: TinkerPath) -> bool:
        """False if it already was public (the caller decides whether that is an error)."""
        if self.is_public(path):
            return False
        doc = {"tinker_path": str(path), "published_at": time.time()}
        self.objects.put_bytes(_key(path), json.dumps(doc).encode(), "application/json")
        return True

    def unpublish(self, path: TinkerPath) -> bool:
        """False if it was not public."""
        if not self.is_public(path):
            return False
        self.objects.delete(_key(path))
        return True

    def is_public(self, path: TinkerPath) -> bool:
        return self.objects.exists(_key(path))

    def published(self, run_id: str | None = None) -> set[TinkerPath]:
        """Every published checkpoint, or those of one run (one listing, no document read)."""
        found = set()
        for key in self.objects.list_keys(PUBLIC_PREFIX + (f"{run_id}/" if run_id else "")):
            parts = key[len(PUBLIC_PREFIX):].split("/")
            if len(parts) != 3 or parts[1] not in CHECKPOINT_TYPES:
                continue
            try:
                found.add(TinkerPath.parse(f"tinker://{'/'.join(parts)}"))
            except InvalidPath:
                continue
        return found
