"""Op handlers that move adapters between the backend and S3: save_weights, save_weights_for_sampler,
save_weights_external, load_weights.

The snapshot is taken on the compute thread in seq_id order (a save sees every earlier optim_step); the upload
runs on an I/O thread, so other models keep computing while it goes out.

Saves are idempotent under recovery: a trainer that crashed after a save but before its offset was durable
applies the save again. Finding its own earlier save at the path (the same model's training state saved at the
same seq_id, or sampler weights equal to the ones being saved) is then a success, not "already exists".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgspec
import torch

from artifact_store import (
    Checkpoint,
    CheckpointExists,
    CheckpointInfo,
    CheckpointNotFound,
    SamplingSession,
    TinkerPath,
    check_name,
)
from artifact_store.lora_targets import ATTN_MODULES, MLP_MODULES, UNEMBED_MODULES, trained_blocks
from bus_events import payloads as p
from bus_runtime.errors import UserError
from trainer_consumer.backends.base import LORA_ALPHA, AdapterExport, AdapterSpec, TrainingBackend
from trainer_consumer.inbound import Inbound
from trainer_consumer.model_state import ModelState
from trainer_consumer.ops.install import install
from trainer_consumer.ops.training import require_state
from trainer_consumer.runtime import Runtime, default_seed
from trainer_consumer.state_record import StateFormatError, TrainingStateRecord, read_state
from trainer_consumer.stream import ModelStream


def training_state(backend: TrainingBackend, model_id: str) -> tuple[AdapterExport, dict]:
    return backend.export_adapter(model_id), backend.export_optimizer(model_id)


async def save_weights(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.SaveWeights) -> p.PathResult:
    state = require_state(stream, inbound)
    path = TinkerPath(state.model_id, "weights", check_name(payload.name))
    adapter, optimizer = await rt.compute(training_state, rt.backend, state.model_id)
    record = state.record(inbound.env.seq_id, inbound.position)
    checkpoint = Checkpoint(adapter.config, adapter.weights, optimizer, record.to_json())
    try:
        await rt.io(rt.storage.checkpoints.save, path, checkpoint, base_model=state.base_model,
                    overwrite=payload.overwrite, ttl_seconds=payload.ttl_seconds, user_metadata=payload.user_metadata)
    except CheckpointExists:
        if not await rt.io(_saved_by, rt, path, lambda existing: _same_training_save(existing, record)):
            raise
    return p.PathResult(path=str(path))


def _same_training_save(existing: Checkpoint, ours: TrainingStateRecord) -> bool:
    """This very save, applied before a crash: same model, same seq_id (seq-less saves are never matched)."""
    try:
        theirs = read_state(existing.state)
    except StateFormatError:
        return False
    return ours.saved_at_seq_id is not None and theirs is not None and theirs.model_id == ours.model_id \
        and theirs.saved_at_seq_id == ours.saved_at_seq_id


def _same_weights(existing: Checkpoint, ours: Checkpoint) -> bool:
    a, b = existing.adapter_weights, ours.adapter_weights
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _saved_by(rt: Runtime, path: TinkerPath, matches: Callable[[Checkpoint], bool]) -> bool:
    try:
        return matches(rt.storage.checkpoints.load(path))
    except CheckpointNotFound:
        return False


async def save_weights_for_sampler(rt: Runtime, stream: ModelStream, inbound: Inbound,
                                   payload: p.SaveWeightsForSampler) -> p.PathResult:
    state = require_state(stream, inbound)
    if payload.name is None and payload.sampling_session_id is None:
        raise UserError("save_weights_for_sampler needs a name or a sampling_session_id")
    ephemeral = payload.name is None
    ttl: int | None
    if payload.kind == "inflight":  # the model's one mutable target: every inflight session samples its newest
        name, ttl = p.INFLIGHT_NAME, payload.ttl_seconds or rt.config.ephemeral_ttl_s
    elif ephemeral:
        suffix = inbound.env.seq_id if inbound.env.seq_id is not None else inbound.env.request_id
        name, ttl = f"ephemeral-{suffix}", payload.ttl_seconds or rt.config.ephemeral_ttl_s
    else:
        name, ttl = check_name(payload.name or ""), payload.ttl_seconds
    path = TinkerPath(state.model_id, "sampler_weights", name)
    # An ephemeral name is ours (derived from the seq_id, or the inflight target), so a save may overwrite it.
    await _save_adapter(rt, state, path, overwrite=ephemeral, ttl_seconds=ttl, user_metadata=payload.user_metadata)
    if payload.sampling_session_id is not None:
        session = SamplingSession(sampling_session_id=payload.sampling_session_id, base_model=state.base_model,
                                  tenant=state.tenant, model_path=str(path))
        await rt.io(rt.storage.registry.put_sampling_session, session)
    return p.PathResult(path=str(path), sampling_session_id=payload.sampling_session_id)


async def save_weights_external(rt: Runtime, stream: ModelStream, inbound: Inbound,
                                payload: p.SaveWeightsExternal) -> p.PathResult:
    state = require_state(stream, inbound)
    path = TinkerPath(state.model_id, "external_weights", check_name(payload.name))
    info = await _save_adapter(rt, state, path, overwrite=False, ttl_seconds=payload.ttl_seconds, user_metadata={})
    return p.PathResult(path=str(path), size_bytes=info.size_bytes)


async def _save_adapter(rt: Runtime, state: ModelState, path: TinkerPath, *, overwrite: bool,
                        ttl_seconds: int | None, user_metadata: dict[str, str]) -> CheckpointInfo:
    """The live adapter (PEFT files only) at `path`, as of this event's place in the model's seq_id order."""
    adapter = await rt.compute(rt.backend.export_adapter, state.model_id)
    checkpoint = Checkpoint(adapter.config, adapter.weights)
    try:
        return await rt.io(rt.storage.checkpoints.save, path, checkpoint, base_model=state.base_model,
                           overwrite=overwrite, ttl_seconds=ttl_seconds, user_metadata=user_metadata)
    except CheckpointExists:  # the path is this model's own: equal weights there are this save, applied before
        if not await rt.io(_saved_by, rt, path, lambda existing: _same_weights(existing, checkpoint)):
            raise
        return await rt.io(rt.storage.checkpoints.info, path)


def spec_from_checkpoint(checkpoint: Checkpoint, record: TrainingStateRecord | None, base_model: str,
                         seed: int) -> AdapterSpec:
    """The adapter a checkpoint needs: from our state.json, else from its PEFT adapter_config.json."""
    try:
        if record is not None:
            return record.lora.spec(base_model)
        config = checkpoint.adapter_config
        targets = config.get("target_modules")
        if not isinstance(targets, list):
            raise UserError(f"checkpoint adapter_config target_modules {targets!r} is not a list of module names")
        unknown = set(targets) - {*ATTN_MODULES, *MLP_MODULES, *UNEMBED_MODULES}
        if unknown:
            raise UserError(f"checkpoint targets modules this trainer does not train: {sorted(unknown)}")
        attn, mlp, unembed = trained_blocks(targets)
        return AdapterSpec(base_model=base_model, alpha=float(config.get("lora_alpha", LORA_ALPHA)),
                           lora=p.LoraSpec(rank=int(config["r"]), seed=seed, train_attn=attn, train_mlp=mlp,
                                           train_unembed=unembed))
    except msgspec.ValidationError as exc:  # rank out of range, no block trained...
        raise UserError(f"checkpoint has an unusable LoRA spec: {exc}") from exc


def _read_checkpoint(rt: Runtime, path: TinkerPath, tenant: str) -> tuple[Checkpoint, CheckpointInfo]:
    run = rt.storage.registry.get_run(path.run_id)
    # Another tenant's checkpoint looks exactly like a missing one, unless it is published.
    if run is not None and run.tenant != tenant and not rt.storage.checkpoints.publications.is_public(path):
        raise CheckpointNotFound(f"no checkpoint at {path}")
    return rt.storage.checkpoints.load_with_info(path)


async def load_weights(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.LoadWeights) -> p.PathResult:
    env = inbound.env
    path = TinkerPath.parse(payload.path)
    if path.kind != "weights":
        raise UserError(f"load_weights needs a training-state path (tinker://<run>/weights/<name>), got {path}")
    if stream.state is None and env.seq_id not in (0, None):
        raise UserError(f"unknown model {stream.model_id!r}: a load_weights that creates a model must be its first "
                        f"request (seq_id 0), got seq_id {env.seq_id}")
    checkpoint, info = await rt.io(_read_checkpoint, rt, path, env.tenant)
    try:
        record = read_state(checkpoint.state)
    except StateFormatError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from exc
    saved_step = record.step if record is not None else 0
    if stream.state is None:  # create-via-load
        base_model = payload.base_model or (record.base_model if record is not None else None) or info.base_model
        rt.check_base_model(base_model)
        spec = spec_from_checkpoint(checkpoint, record, base_model, default_seed(stream.model_id))
        if not payload.optimizer:  # a fresh optimizer: of the family the request names (AdamW by default)
            spec = dataclasses.replace(spec, optimizer=(payload.optimizer_config or p.OptimizerSpec()).type)
        state = ModelState(model_id=stream.model_id, tenant=env.tenant, spec=spec, session_id=payload.session_id,
                           user_metadata=dict(payload.user_metadata), step=saved_step, mutations=1)
        await install(rt, state, checkpoint, with_optimizer=payload.optimizer, register_run=True)
        stream.state = state
        return p.PathResult(path=str(path), model_id=state.model_id)
    state = require_state(stream, inbound)  # legacy: load into the model create_model just made
    if not (env.seq_id == 1 or (env.seq_id is None and state.mutations == 0)):
        raise UserError("load_weights into an existing model is only accepted as its first request after "
                        f"create_model (seq_id 1), got seq_id {env.seq_id}; create a new training client from the "
                        "checkpoint instead")
    wanted = spec_from_checkpoint(checkpoint, record, state.base_model, state.spec.seed)
    if (wanted.rank, wanted.target_modules, wanted.alpha) != (state.spec.rank, state.spec.target_modules,
                                                              state.spec.alpha):
        raise UserError(f"checkpoint {path} has LoRA rank {wanted.rank} on {wanted.target_modules}, but model "
                        f"{state.model_id} has rank {state.spec.rank} on {state.spec.target_modules}")
    if info.base_model != state.base_model:
        raise UserError(f"checkpoint {path} was trained on {info.base_model!r}, model {state.model_id} uses "
                        f"{state.base_model!r}")
    await rt.compute(rt.backend.load_adapter, state.model_id, checkpoint.adapter_weights,
                     checkpoint.optimizer_state if payload.optimizer else None)
    state.step, state.window_failure, state.window_open = saved_step, None, False
    state.mutations += 1
    return p.PathResult(path=str(path), model_id=state.model_id)
