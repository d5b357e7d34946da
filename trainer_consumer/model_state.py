"""What the engine knows about one training model besides its tensors (those live in the backend)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bus_events import payloads as p
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.errors import Category

STATE_FORMAT = 1


@dataclass(frozen=True)
class WindowFailure:
    """A forward_backward of the current gradient window failed (or may be missing): the window is poisoned."""

    request: str  # which request, for the optim_step's error: "forward_backward seq_id 7", "seq_id 8"
    message: str
    category: Category


@dataclass(frozen=True)
class BusPosition:
    topic: str
    partition: int
    offset: int


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
        return p.ModelInfo(model_id=self.model_id, base_model=self.base_model, lora_rank=self.spec.rank,
                           train_attn=self.spec.train_attn, train_mlp=self.spec.train_mlp,
                           train_unembed=self.spec.train_unembed, step=self.step)

    def checkpoint_state(self, seq_id: int | None, position: BusPosition | None) -> dict[str, Any]:
        """state.json of a training-state checkpoint: everything needed to resume, and where on the bus."""
        return {
            "format": STATE_FORMAT,
            "model_id": self.model_id,
            "tenant": self.tenant,
            "base_model": self.base_model,
            "lora": dataclasses.asdict(self.spec),
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
        return cls(model_id=state["model_id"], tenant=state["tenant"], spec=AdapterSpec(**state["lora"]),
                   session_id=state.get("session_id"), user_metadata=dict(state.get("user_metadata") or {}),
                   step=int(state["step"]), last_applied_seq_id=state.get("last_applied_seq_id"),
                   mutations=int(state.get("mutations", 0)), unloaded=bool(state.get("unloaded", False)),
                   last_adam_params=msgspec.convert(adam, p.AdamParams) if adam else None)


def lasting_key(state: ModelState | None) -> tuple:
    """Everything an event can change that outlives it. An event that leaves this unchanged (get_info, a forward
    pass, a save, an error) needs no snapshot: re-applying it after a crash would change nothing."""
    if state is None:
        return (None,)
    return (id(state), state.step, state.mutations, state.window_failure, state.window_open, state.unloaded)
