"""JSON-API adapter names: the user picks a name per tenant ("my-model"), and the name maps onto an ordinary
model id of ours, so the event log, replay, checkpoints and the Tinker API see an ordinary model.

One small document per name in the object store, next to the registry's documents:

    adapter_names/<tenant digest>/<name>.json    AdapterName: model id, base model, generation, removed

Creating a name must happen once even when two gateway instances see its first call at the same moment. The
object store has no conditional put, so the model id is a pure function of (tenant, name, generation): both
instances write the same document and publish the same create_model at seq_id 0, and the duplicate collapses
in the gateway's and the trainer's (model_id, seq_id) dedupe. Removing a name bumps the generation, so a name
used again after removal starts a fresh model instead of reviving the unloaded one.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import msgspec

from artifact_store import ObjectStore
from bus_events import payloads as p
from bus_events.ids import model_id_for

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = ("an adapter name is 1 to 64 characters: letters, digits, '.', '_' or '-', starting with a letter or "
             "digit")
PREFIX = "adapter_names/"


class InvalidAdapterName(ValueError):
    pass


class AdapterName(msgspec.Struct, kw_only=True):
    """Everything create_model needs, so that every gateway publishes the very same create for the name."""

    name: str
    tenant: str
    model_id: str
    base_model: str
    lora: p.LoraSpec
    user_metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    generation: int = 0
    removed: bool = False
    created_at: float = msgspec.field(default_factory=time.time)


def check_adapter_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidAdapterName(f"{name!r} is not a valid adapter name: {NAME_RULE}")
    return name


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def named_model_id(tenant: str, name: str, generation: int) -> str:
    """The model id of generation `generation` of `name`: the same on every gateway instance."""
    return model_id_for(f"adapter-{_digest(tenant, name, str(generation))[:24]}", 0)


class AdapterNames:
    """The name -> model documents of all tenants (no cache: a name's document changes when it is removed)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @staticmethod
    def _tenant_prefix(tenant: str) -> str:
        return f"{PREFIX}{_digest(tenant)[:24]}/"  # tenants are free text; keys must not be

    def _key(self, tenant: str, name: str) -> str:
        return f"{self._tenant_prefix(tenant)}{name}.json"

    def get(self, tenant: str, name: str) -> AdapterName | None:
        data = self.objects.get_bytes_or_none(self._key(tenant, name))
        return None if data is None else msgspec.json.decode(data, type=AdapterName)

    def put(self, record: AdapterName) -> None:
        self.objects.put_bytes(self._key(record.tenant, record.name), msgspec.json.encode(record),
                               "application/json")

    def list(self, tenant: str) -> list[AdapterName]:
        found = [self.objects.get_bytes_or_none(key) for key in self.objects.list_keys(self._tenant_prefix(tenant))]
        records = [msgspec.json.decode(data, type=AdapterName) for data in found if data is not None]
        return sorted(records, key=lambda r: r.created_at)
