"""The op handlers: one per training event type, each `(runtime, stream, inbound, payload) -> result struct`, with
the event's payload passed typed. training.py: lifecycle and training; checkpoints.py: adapters to and from S3;
export.py: merged models to S3."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from bus_events import EventType
from trainer_consumer.inbound import Inbound
from trainer_consumer.ops import checkpoints, export, training
from trainer_consumer.runtime import Runtime
from trainer_consumer.stream import ModelStream

# Each handler's payload parameter is the struct of its event type (bus_events.PAYLOAD_TYPES), which the intake
# decoded; the table itself cannot say so per entry.
Handler = Callable[[Runtime, ModelStream, Inbound, Any], Awaitable[msgspec.Struct]]

HANDLERS: dict[EventType, Handler] = {
    EventType.CREATE_MODEL: training.create_model,
    EventType.GET_INFO: training.get_info,
    EventType.FORWARD_BACKWARD: training.forward_backward,
    EventType.OPTIM_STEP: training.optim_step,
    EventType.UNLOAD_MODEL: training.unload_model,
    EventType.LOAD_WEIGHTS: checkpoints.load_weights,
    EventType.SAVE_WEIGHTS: checkpoints.save_weights,
    EventType.SAVE_WEIGHTS_FOR_SAMPLER: checkpoints.save_weights_for_sampler,
    EventType.SAVE_WEIGHTS_EXTERNAL: checkpoints.save_weights_external,
    EventType.EXPORT_MODEL: export.export_model,
}
