"""AdamW for a tensor-parallel adapter: the shared AdapterOptimizer, with the gradient norm taken over TP ranks.

With TP > 1 a rank holds shards of some LoRA tensors (B of column-parallel, A of row-parallel linears) and whole
copies of the others, so the global norm is sqrt(all-reduced sum of the shards' squares + the replicas' squares).
Everything else (AdamW update, decoupled weight decay, metrics) is AdapterOptimizer's, run on the local shards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec
import torch
from torch.nn.utils import clip_grads_with_norm_

from bus_events import payloads as p
from trainer_consumer.backends.adamw import AdapterOptimizer, NonFiniteGradients
from trainer_consumer.backends.megatron.parallel import sum_over_tp


class TensorParallelAdapterOptimizer(AdapterOptimizer):
    def __init__(self, params: Mapping[str, torch.nn.Parameter], sharded: set[str]):
        super().__init__(params)
        self.sharded = sharded  # PEFT keys whose local tensor is a shard; the others are replicated

    def global_grad_norm(self) -> float:
        on = next(iter(self.params.values())).device
        sharded, replicated = torch.zeros((), dtype=torch.float64, device=on), torch.zeros((), dtype=torch.float64,
                                                                                             device=on)
        for key, param in self.params.items():
            if param.grad is not None:
                square = param.grad.detach().double().pow(2).sum()
                if key in self.sharded:
                    sharded += square
                else:
                    replicated += square
        return math.sqrt(float(sum_over_tp(sharded) + replicated))

    def step(self, adam: p.AdamParams) -> dict[str, float]:
        grad_norm = self.global_grad_norm()
        if not math.isfinite(grad_norm):
            self.zero_grad()
            raise NonFiniteGradients(f"the accumulated gradients are not finite (grad_norm={grad_norm}); the step was "
                                     "skipped, the gradients discarded and the weights left unchanged")
        if adam.grad_clip_norm > 0:
            clip_grads_with_norm_(list(self.params.values()), adam.grad_clip_norm, torch.tensor(grad_norm))
        # Clipping is done above with the global norm; the parent must not clip again with its local one.
        metrics = super().step(msgspec.structs.replace(adam, grad_clip_norm=0.0))
        metrics["grad_norm"] = grad_norm
        metrics["grad_norm_clipped"] = min(grad_norm, adam.grad_clip_norm) if adam.grad_clip_norm > 0 else grad_norm
        return metrics
