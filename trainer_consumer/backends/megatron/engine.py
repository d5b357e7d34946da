"""The Megatron training backend as run by EVERY tensor-parallel rank (SPMD): same calls, same order.

Each method first validates its input without communicating, so a bad request raises the same error on every
rank before any collective starts; after that the ranks stay in lock-step. Results are identical on all ranks
(logprobs and losses are reduced over TP, adapter exports all-gathered), so rank 0's copy is the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bus_events import payloads as p
from bus_runtime.base_models import BaseModelInfo, info_from_config
from trainer_consumer.backends.adamw import AdapterOptimizer
from trainer_consumer.backends.adapters import AdapterRegistry, check_adapter_weights
from trainer_consumer.backends.base import AdapterExport, AdapterSpec, ForwardBackwardOutput
from trainer_consumer.backends.batch import run_forward_backward
from trainer_consumer.backends.init import seeded_init
from trainer_consumer.backends.megatron.config import ModelShape, build_gpt_model, model_shape
from trainer_consumer.backends.megatron.convert import load_hf_weights, safetensors_source
from trainer_consumer.backends.megatron.forward import checkpoint_layers, target_logprobs
from trainer_consumer.backends.megatron.layout import ParallelLinear, all_linears
from trainer_consumer.backends.megatron.lora import (
    ActiveAdapter,
    LocalAdapter,
    attach_hooks,
    build_local_adapter,
    set_local_values,
)
from trainer_consumer.backends.megatron.optimizer import TensorParallelAdapterOptimizer
from trainer_consumer.backends.megatron.parallel import all_gather_object, device, tp_rank, tp_size
from trainer_consumer.backends.peft_config import adapter_config, lora_config

log = logging.getLogger(__name__)


@dataclass
class _Base:
    info: BaseModelInfo
    shape: ModelShape
    model: torch.nn.Module
    linears: list[ParallelLinear]
    active: ActiveAdapter


@dataclass
class _Adapter:
    spec: AdapterSpec
    base: _Base
    local: LocalAdapter
    optimizer: AdapterOptimizer


class MegatronEngine:
    def __init__(self, *, logprob_chunk_tokens: int = 1024, micro_batch_tokens: int = 16384,
                 gradient_checkpointing: bool = False):
        self.dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.gradient_checkpointing = gradient_checkpointing
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self._models: AdapterRegistry[_Base, _Adapter] = AdapterRegistry(self._load_base)

    # ------------------------------------------------------------------ base models
    def _load_base(self, name: str) -> _Base:
        from transformers import AutoConfig

        from bus_runtime.base_models import resolve_base_model

        path = resolve_base_model(name)
        hf_config = AutoConfig.from_pretrained(path)
        shape = model_shape(hf_config)
        log.info("loading %s from %s into megatron-core (TP %d, %s)", name, path, tp_size(), self.dtype)
        model = build_gpt_model(shape, tp_size=tp_size(), dtype=self.dtype)
        with safetensors_source(path) as source:
            load_hf_weights(model, source, shape, tp_rank(), tp_size())
        return self._adopt_base(info_from_config(name, hf_config.to_dict()), model, shape)

    def _adopt_base(self, info: BaseModelInfo, model: torch.nn.Module, shape: ModelShape) -> _Base:
        model.requires_grad_(False)
        if self.gradient_checkpointing:
            checkpoint_layers(model)
        model.train()  # every dropout is 0, so train and eval mode compute the same
        linears = all_linears(shape)
        return _Base(info=info, shape=shape, model=model, linears=linears,
                     active=attach_hooks(model, linears, tp_size()))

    def base_model_info(self, base_model: str) -> BaseModelInfo:
        return self._models.base(base_model).info

    # ------------------------------------------------------------------ adapters
    def _adapter(self, model_id: str) -> _Adapter:
        return self._models.adapter(model_id)

    def create_adapter(self, model_id: str, spec: AdapterSpec) -> None:
        self._models.check_new(model_id)
        base = self._models.base(spec.base_model)
        local = build_local_adapter(base.linears, set(spec.target_modules), spec.rank, spec.alpha, tp_size(),
                                    device())
        # The HF backend's initialisation on the full PEFT shapes, then this rank's slice: the same seed gives the
        # same adapter in either backend and at any TP size.
        full = {key: torch.empty(self._full_shape(local, key)) for key in local.params}
        seeded_init(full, spec.seed)
        set_local_values(local, full, tp_rank(), tp_size())
        sharded = {key for key, rule in local.sharding.items() if rule.dim is not None}
        optimizer = (AdapterOptimizer(local.params) if tp_size() == 1
                     else TensorParallelAdapterOptimizer(local.params, sharded))
        self._models.add(model_id, _Adapter(spec=spec, base=base, local=local, optimizer=optimizer))

    @staticmethod
    def _full_shape(local: LocalAdapter, key: str) -> list[int]:
        shape = list(local.params[key].shape)
        rule = local.sharding[key]
        if rule.dim is not None:
            shape[rule.dim] = rule.full_length
        return shape

    def remove_adapter(self, model_id: str) -> None:
        adapter = self._models.pop(model_id)
        if adapter is not None and adapter.base.active.adapter is adapter.local:
            adapter.base.active.adapter = None

    # ------------------------------------------------------------------ training
    def forward_backward(self, model_id: str, data: Sequence[p.Datum], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str], forward_only: bool) -> ForwardBackwardOutput:
        adapter = self._adapter(model_id)
        base = adapter.base
        base.active.adapter = adapter.local
        return run_forward_backward(
            data, loss_fn, loss_fn_config, forward_only, vocab_size=base.info.vocab_size,
            max_positions=base.info.max_positions, micro_batch_tokens=self.micro_batch_tokens,
            logprobs_of=lambda batch: target_logprobs(base.model, batch, base.shape.vocab_size,
                                                      self.logprob_chunk_tokens),
            top_k_targets=False)  # its vocabulary-parallel logprobs gather one target per position

    def optim_step(self, model_id: str, params: p.AdamParams) -> dict[str, float]:
        return self._adapter(model_id).optimizer.step(params)

    def discard_gradients(self, model_id: str) -> None:
        self._adapter(model_id).optimizer.zero_grad()

    def peak_memory_gib(self, reset: bool) -> list[float]:
        local = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        if reset and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return all_gather_object(local)

    # ------------------------------------------------------------------ state in and out
    def export_adapter(self, model_id: str) -> AdapterExport:
        adapter = self._adapter(model_id)
        config = adapter_config(lora_config(adapter.spec).to_dict(), adapter.spec)
        return AdapterExport(config=config, weights=adapter.local.full_tensors())

    def export_optimizer(self, model_id: str) -> dict[str, torch.Tensor]:
        adapter = self._adapter(model_id)
        local_state = adapter.optimizer.export_state()
        if tp_size() == 1:
            return local_state
        out = {}
        for name, tensor in local_state.items():
            key, _, moment = name.rpartition(".")
            out[name] = tensor if moment == "step" else adapter.local.gather_like(key, tensor)
        return out

    def load_adapter(self, model_id: str, weights: Mapping[str, torch.Tensor],
                     optimizer_state: Mapping[str, torch.Tensor] | None) -> None:
        adapter = self._adapter(model_id)
        local = adapter.local
        check_adapter_weights({key: self._full_shape(local, key) for key in local.params}, weights)
        local_moments = None
        if optimizer_state is not None:
            local_moments = {}
            for name, tensor in optimizer_state.items():
                key, _, moment = name.rpartition(".")
                sliced = moment != "step" and key in local.params and list(tensor.shape) == self._full_shape(local, key)
                local_moments[name] = local.local_view(key, tensor, tp_rank(), tp_size()) if sliced else tensor
        adapter.optimizer.import_state(local_moments)  # validates before any weight changes
        set_local_values(local, weights, tp_rank(), tp_size())
        adapter.optimizer.zero_grad()
