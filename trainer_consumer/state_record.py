"""state.json: the record beside a training-state checkpoint's tensors (save_weights, and the trainer's own
snapshots), one msgspec struct read and written in one place. `format` names this layout; fields added later get
defaults, so older files keep loading (unknown fields are ignored)."""

from __future__ import annotations

from typing import Any

import msgspec

from bus_events import payloads as p
from trainer_consumer.backends.base import LORA_ALPHA, AdapterSpec
from trainer_consumer.durability import DurablePoint
from trainer_consumer.inbound import BusPosition

STATE_FORMAT = 1


class StateFormatError(ValueError):
    """A state.json this trainer cannot read (another format, or fields of the wrong type)."""


class LoraRecord(p.LoraSpec, kw_only=True, omit_defaults=False, forbid_unknown_fields=False):
    """The adapter spec, flattened (the shape every state.json so far has): the wire's LoraSpec with its seed
    resolved, plus the base model and alpha. Unlike the wire it writes every field and reads past unknown ones,
    so trainers of other versions read each other's files."""

    base_model: str
    alpha: float = LORA_ALPHA
    optimizer: str = "adamw"  # the optimizer family (files written before Dimuon have none: AdamW)

    @classmethod
    def of(cls, spec: AdapterSpec) -> LoraRecord:
        lora = spec.lora
        return cls(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                   train_unembed=lora.train_unembed, base_model=spec.base_model, alpha=spec.alpha,
                   optimizer=spec.optimizer)

    def spec(self, base_model: str | None = None) -> AdapterSpec:
        """The AdapterSpec (on `base_model` instead of the recorded one, when given)."""
        lora = p.LoraSpec(rank=self.rank, seed=self.seed, train_attn=self.train_attn, train_mlp=self.train_mlp,
                          train_unembed=self.train_unembed)
        return AdapterSpec(base_model=base_model or self.base_model, lora=lora, alpha=self.alpha,
                           optimizer=self.optimizer)


class TrainingStateRecord(msgspec.Struct, kw_only=True):
    format: int = STATE_FORMAT
    model_id: str
    tenant: str
    base_model: str
    lora: LoraRecord
    step: int = 0
    # A save is applied at `saved_at_seq_id`: the state holds the effects of every earlier seq_id.
    saved_at_seq_id: int | None = None
    last_applied_seq_id: int | None = None
    adam_params: p.AdamParams | None = None
    bus_position: BusPosition | None = None
    saved_at: float = 0.0
    # What a snapshot restore needs besides the tensors (model_state.ModelState.from_record).
    session_id: str | None = None
    user_metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    mutations: int = 0
    window_open: bool = False
    unloaded: bool = False
    durable_point: DurablePoint | None = None  # snapshots only: the point of the log the snapshot covers

    def to_json(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


def read_state(doc: dict[str, Any]) -> TrainingStateRecord | None:
    """The record of a checkpoint's state.json; None when it has none (sampler weights, a PEFT upload)."""
    if not doc:
        return None
    if doc.get("format") != STATE_FORMAT:
        raise StateFormatError(f"state.json format {doc.get('format')!r} is not {STATE_FORMAT}")
    try:
        return msgspec.convert(doc, TrainingStateRecord)
    except msgspec.ValidationError as exc:
        raise StateFormatError(f"state.json is not readable: {exc}") from exc
