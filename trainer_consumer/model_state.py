"""What the engine knows about one training model besides its tensors (those live in the backend)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bus_events import payloads as p
from trainer_consumer.backends.base import LORA_ALPHA, AdapterSpec
from trainer_consumer.errors import Category
from trainer_consumer.inbound import BusPosition

STATE_FORMAT = 1


@dataclass(frozen=True)
class WindowFailure:
    """A forward_backward of the current gradient window failed (or may be missing): the window is poisoned."""

    request: str  # which request, for the optim_step's error: "forward_backward seq_id 7", "seq_id 8"
    message: str
    category: Category


@dataclass
class ModelState:
    model_id: str
    tenant: str
    spec: AdapterSpec
    session_id: str | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    step: int = 0  # optimizer steps applied
    last_applied_seq_id: int | None = None
    mutations: int = 0  # forward_backward / optim_step / load_weights applied (legacy load must come first)
    window_failure: WindowFailure | None = None
    # Gradients may be accumulated (a forward_backward ran since the last optim_step): no snapshot until it closes.
    window_open: bool = False
    last_adam_params: p.AdamParams | None = None
    unloaded: bool = False

    @property
    def base_model(self) -> str:
        return self.spec.base_model

    @property
    def window_clean(self) -> bool:
        """No gradients accumulated and no failure pending: the whole state is weights + moments + this record."""
        return not self.window_open and self.window_failure is None

    def poison_window(self, failure: WindowFailure) -> None:
        if self.window_failure is None:  # name the first failure of the window
            self.window_failure = failure

    def model_info(self) -> p.ModelInfo:
        lora = self.spec.lora
        return p.ModelInfo(model_id=self.model_id, base_model=self.base_model, lora_rank=lora.rank,
                           train_attn=lora.train_attn, train_mlp=lora.train_mlp, train_unembed=lora.train_unembed,
                           step=self.step)

    def checkpoint_state(self, seq_id: int | None, position: BusPosition | None) -> dict[str, Any]:
        """state.json of a training-state checkpoint: everything needed to resume, and where on the bus."""
        return {
            "format": STATE_FORMAT,
            "model_id": self.model_id,
            "tenant": self.tenant,
            "base_model": self.base_model,
            "lora": lora_record(self.spec),
            "step": self.step,
            # The save is applied at `saved_at_seq_id`: the state holds the effects of every earlier seq_id.
            "saved_at_seq_id": seq_id,
            "last_applied_seq_id": self.last_applied_seq_id,
            "adam_params": msgspec.to_builtins(self.last_adam_params) if self.last_adam_params else None,
            "bus_position": dataclasses.asdict(position) if position else None,
            "saved_at": time.time(),
            # What a snapshot restore needs besides the tensors (see from_checkpoint_state).
            "session_id": self.session_id,
            "user_metadata": self.user_metadata,
            "mutations": self.mutations,
            "window_open": self.window_open,
            "unloaded": self.unloaded,
        }

    @classmethod
    def from_checkpoint_state(cls, state: dict[str, Any]) -> ModelState:
        """The record a snapshot's state.json describes (its window is always clean: snapshots wait for that)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state.json format {state.get('format')!r} is not {STATE_FORMAT}")
        adam = state.get("adam_params")
        return cls(model_id=state["model_id"], tenant=state["tenant"], spec=spec_from_record(state["lora"]),
                   session_id=state.get("session_id"), user_metadata=dict(state.get("user_metadata") or {}),
                   step=int(state["step"]), last_applied_seq_id=state.get("last_applied_seq_id"),
                   mutations=int(state.get("mutations", 0)), unloaded=bool(state.get("unloaded", False)),
                   last_adam_params=msgspec.convert(adam, p.AdamParams) if adam else None)


def lora_record(spec: AdapterSpec) -> dict[str, Any]:
    """state.json's "lora": the spec flattened (the shape every state.json so far has)."""
    return {"base_model": spec.base_model, **msgspec.to_builtins(spec.lora), "alpha": spec.alpha}


def spec_from_record(lora: Mapping[str, Any], base_model: str | None = None, seed: int | None = None) -> AdapterSpec:
    """The AdapterSpec of a state.json "lora" record; `base_model` / `seed` fill in what an older record lacks."""
    fields = {k: lora[k] for k in ("rank", "train_attn", "train_mlp", "train_unembed") if k in lora}
    return AdapterSpec(base_model=lora.get("base_model") or base_model or "",
                       lora=p.LoraSpec(seed=int(lora.get("seed", seed)), **fields),  # type: ignore[arg-type]
                       alpha=float(lora.get("alpha", LORA_ALPHA)))


def lasting_key(state: ModelState | None) -> tuple:
    """Everything an event can change that outlives it. An event that leaves this unchanged (get_info, a forward
    pass, a save, an error) needs no snapshot: re-applying it after a crash would change nothing."""
    if state is None:
        return (None,)
    return (id(state), state.step, state.mutations, state.window_failure, state.window_open, state.unloaded)
