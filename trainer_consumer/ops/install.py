"""Putting a model's adapter into the backend: created, optionally loaded from a checkpoint, its run registered;
all or nothing. Used by create_model and load_weights (registering the run) and by a snapshot restore (not)."""

from __future__ import annotations

from artifact_store import Checkpoint, TrainingRun
from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.model_state import ModelState
from trainer_consumer.runtime import Runtime


def run_record(state: ModelState) -> TrainingRun:
    return TrainingRun(model_id=state.model_id, base_model=state.base_model, tenant=state.tenant,
                       lora=state.spec.lora, session_id=state.session_id, user_metadata=state.user_metadata,
                       optimizer=state.spec.optimizer)


def _create_and_load(backend: TrainingBackend, state: ModelState, checkpoint: Checkpoint | None,
                     with_optimizer: bool) -> None:
    """On the compute thread, in one go: a load that fails leaves no adapter behind."""
    backend.create_adapter(state.model_id, state.spec)
    if checkpoint is None:
        return
    try:
        backend.load_adapter(state.model_id, checkpoint.adapter_weights,
                             checkpoint.optimizer_state if with_optimizer else None)
    except BaseException:
        backend.remove_adapter(state.model_id)
        raise


async def install(rt: Runtime, state: ModelState, checkpoint: Checkpoint | None = None, *,
                  with_optimizer: bool = False, register_run: bool) -> None:
    """Create the adapter of `state` (loading `checkpoint` into it, with its AdamW moments if `with_optimizer`)
    and, if `register_run`, write its run record; on any failure nothing of it stays in the backend."""
    await rt.compute(_create_and_load, rt.backend, state, checkpoint, with_optimizer)
    if not register_run:
        return
    try:
        await rt.io(rt.storage.registry.put_run, run_record(state))
    except BaseException:
        await rt.compute(rt.backend.remove_adapter, state.model_id)
        raise
