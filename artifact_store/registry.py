"""Small JSON documents that every process can read: training runs, sessions, sampling sessions.

These are durable state (local-infra.md §7: no state in faust tables), written by whoever creates
the thing and read by any gateway, trainer or sampler.

    runs/<model_id>/run.json              TrainingRun: base model, LoRA spec, tenant, user metadata
    sessions/<session_id>.json            client session: tenant, tags, last heartbeat
    sampling_sessions/<id>.json           what a sampling session samples: base model + optional weights path
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from artifact_store.object_store import ObjectStore
from bus_events.ids import SAMPLE_INFIX, TRAIN_INFIX
from bus_events.payloads import LoraSpec

_T = TypeVar("_T")


@dataclass
class TrainingRun:
    model_id: str
    base_model: str
    tenant: str
    lora: LoraSpec  # the contract's LoRA spec, as create_model asked for it (seed resolved)
    session_id: str | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)
    unloaded: bool = False
    # A run made by copy_weights holds only that copy (tinker://...): it is born unloaded, never trained.
    copied_from: str | None = None
    optimizer: str = "adamw"  # the optimizer family the model was created with (bus_events OptimizerSpec.type)

    @property
    def lora_rank(self) -> int:
        return self.lora.rank


def _upgrade_run(doc: dict[str, Any]) -> dict[str, Any]:
    """run.json written before the LoRA spec was embedded kept its fields flat."""
    if "lora" not in doc:
        flat = {key: doc.pop(key) for key in ("lora_rank", "train_attn", "train_mlp", "train_unembed") if key in doc}
        doc["lora"] = {"rank": flat.pop("lora_rank", LoraSpec.rank), **flat}
    return doc


@dataclass
class Session:
    session_id: str
    tenant: str
    tags: list[str] = field(default_factory=list)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    project_id: str | None = None
    created_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.time)
    finished: bool = False
    display_name: str | None = None


@dataclass
class SamplingSession:
    sampling_session_id: str
    base_model: str
    tenant: str
    # tinker:// sampler_weights path; None samples the base model.
    model_path: str | None = None
    created_at: float = field(default_factory=time.time)


class Registry:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def _put(self, key: str, doc: object) -> None:
        self.objects.put_bytes(key, msgspec.json.encode(doc), "application/json")

    def _get(self, key: str, cls: type[_T]) -> _T | None:
        data = self.objects.get_bytes_or_none(key)
        if data is None:
            return None
        doc = json.loads(data)
        return msgspec.convert(_upgrade_run(doc) if cls is TrainingRun else doc, cls)

    def put_run(self, run: TrainingRun) -> None:
        self._put(f"runs/{run.model_id}/run.json", run)

    def get_run(self, model_id: str) -> TrainingRun | None:
        return self._get(f"runs/{model_id}/run.json", TrainingRun)

    def list_runs(self, tenant: str | None = None) -> list[TrainingRun]:
        runs = []
        for key in self.objects.list_keys("runs/"):
            if key.count("/") == 2 and key.endswith("/run.json"):
                run = self._get(key, TrainingRun)
                if run is not None and (tenant is None or run.tenant == tenant):
                    runs.append(run)
        return sorted(runs, key=lambda r: r.created_at)

    def put_session(self, session: Session) -> None:
        self._put(f"sessions/{session.session_id}.json", session)

    def get_session(self, session_id: str) -> Session | None:
        return self._get(f"sessions/{session_id}.json", Session)

    def put_sampling_session(self, s: SamplingSession) -> None:
        self._put(f"sampling_sessions/{s.sampling_session_id}.json", s)

    def get_sampling_session(self, sampling_session_id: str) -> SamplingSession | None:
        return self._get(f"sampling_sessions/{sampling_session_id}.json", SamplingSession)

    def list_sessions(self, tenant: str) -> list[Session]:
        """Every session of `tenant`, oldest first (one read per session in the bucket: fine for a self-hosted
        server's hundreds; an index would be the next step)."""
        found = [self._get(key, Session) for key in self.objects.list_keys("sessions/", recursive=False)
                 if key.endswith(".json")]
        return sorted((s for s in found if s is not None and s.tenant == tenant), key=lambda s: s.created_at)

    def sampling_session_ids(self, session_id: str) -> list[str]:
        """The sampling sessions a client session created (`<session>:sample:<n>`)."""
        prefix = f"sampling_sessions/{session_id}{SAMPLE_INFIX}"
        return sorted(key.removeprefix("sampling_sessions/").removesuffix(".json")
                      for key in self.objects.list_keys(prefix, recursive=False) if key.endswith(".json"))

    def run_ids(self, session_id: str) -> list[str]:
        """The models a client session created (`<session>:train:<n>`), in creation order."""
        found = [key.split("/")[1] for key in self.objects.list_keys(f"runs/{session_id}{TRAIN_INFIX}")
                 if key.count("/") == 2 and key.endswith("/run.json")]
        return sorted(found, key=lambda model_id: int(model_id.rsplit(":", 1)[1]))
