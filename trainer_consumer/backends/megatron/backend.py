"""MegatronBackend: the TrainingBackend protocol on megatron-core (`--backend megatron`).

With tp_size = 1 everything runs in this process. With tp_size > 1 (`tinker-bus trainer --tensor-parallel N`,
TrainerConfig.megatron_tp_size) this process is TP rank 0 and starts tp_size - 1 worker processes, rank r on GPU r
of the visible ones. Only rank 0 is a trainer: the Kafka consumer, scheduling, snapshots and replies stay in this
process, and the workers never see the bus. Every backend call the trainer's compute thread makes is broadcast
(method name + arguments) to the workers on a gloo control group, and all ranks run it in lock-step (engine.py):
the tensors travel over NCCL (gloo on CPU) inside the call, and rank 0 returns the result, the same on every
rank. Arguments travel pickled between processes of this one host that we started ourselves; nothing from the wire is
unpickled. A worker that dies leaves rank 0 blocked in the next collective until the process-group timeout;
`_run` refuses to start a call when a worker is already gone.

Tensor parallelism only: no pipeline or data parallelism, so a base model must fit in tp_size GPUs this way.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from bus_events import payloads as p
from trainer_consumer.backends.base import (
    AdapterExport,
    AdapterSpec,
    BackendInputError,
    BaseModelInfo,
    ForwardBackwardOutput,
)
from trainer_consumer.backends.megatron.engine import MegatronEngine
from trainer_consumer.backends.megatron.parallel import (
    control_group,
    destroy_tensor_parallel,
    free_tcp_init_method,
    init_tensor_parallel,
)

log = logging.getLogger(__name__)
_CLOSE = "close"


def _worker_main(rank: int, world_size: int, init_method: str, engine_kwargs: dict[str, Any]) -> None:
    init_tensor_parallel(rank, world_size, init_method)
    engine = MegatronEngine(**engine_kwargs)
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0, group=control_group())
        method, args = message[0]
        if method == _CLOSE:
            break
        try:
            getattr(engine, method)(*args)
        except Exception:  # rank 0 raises the same error from the same input and reports it
            log.debug("TP rank %d: %s failed", rank, method, exc_info=True)
    destroy_tensor_parallel()


class MegatronBackend:
    def __init__(self, *, tp_size: int = 1, logprob_chunk_tokens: int = 1024, micro_batch_tokens: int = 16384,
                 gradient_checkpointing: bool = False):
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        if torch.cuda.is_available() and tp_size > torch.cuda.device_count():
            raise ValueError(f"tp_size {tp_size} needs as many GPUs; this host has {torch.cuda.device_count()}")
        engine_kwargs: dict[str, Any] = {"logprob_chunk_tokens": logprob_chunk_tokens,
                                         "micro_batch_tokens": micro_batch_tokens,
                                         "gradient_checkpointing": gradient_checkpointing}
        init_method = free_tcp_init_method()
        spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        self._workers = [spawn.Process(target=_worker_main, args=(rank, tp_size, init_method, engine_kwargs),
                                       name=f"megatron-tp-rank-{rank}", daemon=True) for rank in range(1, tp_size)]
        for worker in self._workers:
            worker.start()
        init_tensor_parallel(0, tp_size, init_method)
        self._engine = MegatronEngine(**engine_kwargs)
        self.tp_size = tp_size

    def _run(self, method: str, *args: Any) -> Any:
        if self._workers:
            dead = [worker.name for worker in self._workers if not worker.is_alive()]
            if dead:
                raise RuntimeError(f"tensor-parallel workers {dead} have exited; restart the trainer")
            dist.broadcast_object_list([(method, args)], src=0, group=control_group())
        return getattr(self._engine, method)(*args)

    def close(self) -> None:
        """Stop the workers and leave the process groups (TP > 1: call once, when the trainer shuts down)."""
        if self._workers:
            dist.broadcast_object_list([(_CLOSE, ())], src=0, group=control_group())
            for worker in self._workers:
                worker.join(timeout=60)
            self._workers = []
            destroy_tensor_parallel()

    def peak_memory_gib(self, reset: bool = False) -> list[float]:
        """Each rank's peak of allocated GPU memory (GiB, rank order; NaN on CPU) since the last reset; `reset`
        starts a new peak on every rank after reading it."""
        return self._run("peak_memory_gib", reset)

    # ------------------------------------------------------------------ TrainingBackend
    def base_model_info(self, base_model: str) -> BaseModelInfo:
        return self._run("base_model_info", base_model)

    def create_adapter(self, model_id: str, spec: AdapterSpec) -> None:
        if spec.optimizer != "adamw":  # its tensor-parallel optimizer is AdamW's (megatron/optimizer.py)
            raise BackendInputError(f"optimizer {spec.optimizer!r}: the megatron trainer backend trains with adamw "
                                    "only; use the hf_peft backend for dimuon")
        self._run("create_adapter", model_id, spec)

    def remove_adapter(self, model_id: str) -> None:
        self._run("remove_adapter", model_id)

    def forward_backward(self, model_id: str, data: Sequence[p.Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str], forward_only: bool) -> ForwardBackwardOutput:
        return self._run("forward_backward", model_id, list(data), loss_fn, dict(loss_fn_config), forward_only)

    def optim_step(self, model_id: str, params: p.AdamParams | p.DimuonParams) -> dict[str, float]:
        if not isinstance(params, p.AdamParams):  # no adapter here is anything but AdamW (create_adapter)
            raise BackendInputError("the megatron trainer backend steps adamw models only")
        return self._run("optim_step", model_id, params)

    def discard_gradients(self, model_id: str) -> None:
        self._run("discard_gradients", model_id)

    def export_adapter(self, model_id: str) -> AdapterExport:
        return self._run("export_adapter", model_id)

    def export_optimizer(self, model_id: str) -> dict[str, torch.Tensor]:
        return self._run("export_optimizer", model_id)

    def load_adapter(self, model_id: str, weights: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, torch.Tensor] | None) -> None:
        self._run("load_adapter", model_id, dict(weights), None if optimizer_state is None else dict(optimizer_state))
