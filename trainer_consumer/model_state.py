"""What the engine knows about one training model besides its tensors (those live in the backend)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from bus_events import payloads as p
from bus_runtime.errors import Category
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.inbound import BusPosition
from trainer_consumer.state_record import LoraRecord, TrainingStateRecord

_GENERATIONS = itertools.count()


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
    # Tells this state from any other the stream held before (a create after nothing, a restore): every
    # ModelState gets the next number, so lasting_key changes when the state is replaced.
    generation: int = field(default_factory=lambda: next(_GENERATIONS))

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

    def record(self, seq_id: int | None, position: BusPosition | None) -> TrainingStateRecord:
        """state.json of a training-state checkpoint: everything needed to resume, and where on the bus."""
        return TrainingStateRecord(
            model_id=self.model_id, tenant=self.tenant, base_model=self.base_model, lora=LoraRecord.of(self.spec),
            step=self.step, saved_at_seq_id=seq_id, last_applied_seq_id=self.last_applied_seq_id,
            adam_params=self.last_adam_params, bus_position=position, saved_at=time.time(),
            session_id=self.session_id, user_metadata=self.user_metadata, mutations=self.mutations,
            window_open=self.window_open, unloaded=self.unloaded)

    @classmethod
    def from_record(cls, record: TrainingStateRecord) -> ModelState:
        """The state a snapshot's record describes (its window is always clean: snapshots wait for that)."""
        return cls(model_id=record.model_id, tenant=record.tenant, spec=record.lora.spec(),
                   session_id=record.session_id, user_metadata=dict(record.user_metadata), step=record.step,
                   last_applied_seq_id=record.last_applied_seq_id, mutations=record.mutations,
                   unloaded=record.unloaded, last_adam_params=record.adam_params)


def lasting_key(state: ModelState | None) -> tuple:
    """Everything an event can change that outlives it. An event that leaves this unchanged (get_info, a forward
    pass, a save, an error) needs no snapshot: re-applying it after a crash would change nothing."""
    if state is None:
        return (None,)
    return (state.generation, state.step, state.mutations, state.window_failure, state.window_open, state.unloaded)
