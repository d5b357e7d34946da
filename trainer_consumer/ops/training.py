"""Op handlers for model lifecycle and training: create_model, get_info, forward_backward, optim_step, unload.

Window-failure rule. Gradients accumulate over forward_backward calls until optim_step; the calls between two
optim_steps form a gradient window. If a forward_backward (not forward_only) of the window fails, its future gets
the error (category "user" for bad input, "server" otherwise) and the window is poisoned: the next optim_step
does NOT apply the partial gradient. It fails with an error naming the failed seq_id, the accumulated gradients
are discarded, weights and optimizer moments stay as they were, and the model continues cleanly from there (the
following forward_backward starts a fresh window). A seq_id that never arrived (gap timeout) poisons the window
the same way, since it may have been one of its forward_backwards.
"""

from __future__ import annotations

import msgspec

from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_runtime.errors import ServiceError, UserError
from trainer_consumer.backends.base import AdapterSpec, FbRequest, forward_backward_many
from trainer_consumer.errors import error_info
from trainer_consumer.inbound import Inbound
from trainer_consumer.model_state import ModelState, WindowFailure
from trainer_consumer.ops.install import install, run_record
from trainer_consumer.runtime import Runtime, default_seed
from trainer_consumer.stream import ModelStream


def require_state(stream: ModelStream, inbound: Inbound) -> ModelState:
    state = stream.state
    if stream.unavailable is not None:
        raise ServiceError(stream.unavailable)
    # Another tenant's model is reported exactly like a missing one.
    if state is None or state.tenant != inbound.env.tenant:
        raise UserError(f"unknown model {stream.model_id!r}: no create_model or load_weights (seq_id 0) was applied")
    if state.unloaded:
        raise UserError(f"model {stream.model_id!r} was unloaded")
    return state


async def create_model(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.CreateModel) -> p.ModelInfo:
    if stream.state is not None:
        raise UserError(f"model {stream.model_id!r} already exists")
    rt.check_base_model(payload.base_model)
    lora = payload.lora
    if lora.seed is None:
        lora = msgspec.structs.replace(lora, seed=default_seed(stream.model_id))
    state = ModelState(model_id=stream.model_id, tenant=inbound.env.tenant,
                       spec=AdapterSpec(base_model=payload.base_model, lora=lora, optimizer=payload.optimizer.type),
                       session_id=payload.session_id, user_metadata=dict(payload.user_metadata))
    await install(rt, state, register_run=True)
    stream.state = state
    return state.model_info()


async def get_info(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.GetInfo) -> p.ModelInfo:
    return require_state(stream, inbound).model_info()


async def forward_backward(rt: Runtime, stream: ModelStream, inbound: Inbound,
                           payload: p.ForwardBackward) -> p.ForwardBackwardResult:
    state = require_state(stream, inbound)
    if not payload.forward_only:
        state.mutations += 1
        state.window_open = True
    request = FbRequest(state.model_id, payload.data, payload.loss_fn, payload.loss_fn_config, payload.forward_only)
    try:
        out = (await rt.compute(forward_backward_many, rt.backend, [request]))[0]
        if isinstance(out, Exception):
            raise out
    except Exception as exc:
        if not payload.forward_only:
            info = error_info(exc)
            seq = inbound.env.seq_id
            which = f"forward_backward seq_id {seq}" if seq is not None else "a forward_backward without seq_id"
            state.poison_window(WindowFailure(which, info.message, info.category))
        raise
    return p.ForwardBackwardResult(outputs=[{"logprobs": tensor_from_numpy(lp, "float32")} for lp in out.logprobs],
                                   metrics=out.metrics)


async def optim_step(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.OptimStep) -> p.OptimStepResult:
    state = require_state(stream, inbound)
    failure = state.window_failure
    if failure is not None:
        state.window_failure = None
        await rt.compute(rt.backend.discard_gradients, state.model_id)
        state.window_open = False
        raise ServiceError(
            f"optim_step not applied: {failure.request} of this gradient window failed ({failure.message}). "
            "The window's accumulated gradients were discarded and the weights left unchanged; the model "
            "continues from its previous step.", failure.category)
    family = "dimuon" if payload.dimuon_params is not None else "adamw"
    if family != state.spec.optimizer:
        raise UserError(f"model {state.model_id!r} was created with the {state.spec.optimizer} optimizer; its "
                        f"optim_step must send {state.spec.optimizer} parameters, got {family} parameters")
    metrics = await rt.compute(rt.backend.optim_step, state.model_id, payload.dimuon_params or payload.adam_params)
    state.window_open = False
    state.step += 1
    state.mutations += 1
    if payload.dimuon_params is None:
        state.last_adam_params = payload.adam_params
    return p.OptimStepResult(metrics=metrics)


async def unload_model(rt: Runtime, stream: ModelStream, inbound: Inbound, payload: p.UnloadModel) -> p.PathResult:
    state = require_state(stream, inbound)
    await rt.compute(rt.backend.remove_adapter, state.model_id)
    state.unloaded = True
    await rt.io(_mark_unloaded, rt, state)
    return p.PathResult(model_id=state.model_id)


def _mark_unloaded(rt: Runtime, state: ModelState) -> None:
    record = rt.storage.registry.get_run(state.model_id) or run_record(state)
    record.unloaded = True
    rt.storage.registry.put_run(record)
