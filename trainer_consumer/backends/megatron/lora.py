"""Multi-adapter LoRA for megatron-core's parallel linears (megatron-core ships none; offline-models.md section 7).

Every HF projection keeps its own LoRA pair, also inside megatron's fused layers: linear_qkv carries separate
(A_q, B_q), (A_k, B_k), (A_v, B_v) whose outputs are interleaved exactly like the fused base rows, so an adapter
is parameter-for-parameter the PEFT adapter (export and import are exact, and AdamW sees the same parameters).

Tensor parallelism follows the wrapped linear:
- column-parallel (qkv, fc1, lm_head): A replicated, B sharded by output rows like the base rows. The rank-r
  activation x·Aᵀ goes through copy_to_tensor_model_parallel_region, so its gradient (and with it A's gradient
  and the input gradient) is summed over the ranks exactly where the base layer sums its input gradient.
- row-parallel (o_proj, down_proj): A sharded by input columns like the base, B replicated. The partial x·Aᵀ is
  all-reduced (reduce_from_tensor_model_parallel_region) before B; that all-reduce carries r numbers per token
  instead of the hidden size, and it is the same sum the base layer performs on its own output.

LoRA runs as forward hooks, so the base model's modules and state dict stay untouched; a hook adds nothing
unless an adapter is active and targets one of its projections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainer_consumer.backends.megatron.layout import ParallelLinear, Part, interleave
from trainer_consumer.backends.megatron.parallel import gather, shard


def peft_key(part: Part, matrix: str) -> str:
    return f"base_model.model.{part.hf_module}.lora_{matrix}.weight"


@dataclass(frozen=True)
class Sharding:
    """How a local LoRA tensor relates to the PEFT tensor: split along `dim` (None: replicated)."""

    dim: int | None
    full_length: int = 0


@dataclass
class LocalAdapter:
    """One adapter's LoRA tensors on this TP rank, keyed by PEFT name."""

    rank: int
    scale: float
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    sharding: dict[str, Sharding] = field(default_factory=dict)

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT-shaped CPU copies of the weights (all-gathered over TP: every rank must call this)."""
        return {key: self.gather_like(key, param.detach()) for key, param in self.params.items()}

    def gather_like(self, key: str, local: torch.Tensor) -> torch.Tensor:
        """A PEFT-shaped CPU copy of a tensor sharded like parameter `key` (its weight or an AdamW moment)."""
        rule = self.sharding[key]
        full = local if rule.dim is None else gather(local.to(self.params[key].device), rule.dim, rule.full_length)
        return full.to("cpu", copy=True)

    def local_view(self, key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This rank's slice of a PEFT-shaped tensor of parameter `key` (a weight or an AdamW moment)."""
        rule = self.sharding[key]
        return full if rule.dim is None else shard(full, rule.dim, tp_rank, tp_size)


def build_local_adapter(linears: list[ParallelLinear], target_modules: set[str], rank: int, alpha: float,
                        tp_size: int, device: torch.device) -> LocalAdapter:
    """Zero-initialised LoRA tensors (fp32) for every targeted projection; the caller sets their values."""
    adapter = LocalAdapter(rank=rank, scale=alpha / rank)
    for linear in linears:
        for part in linear.parts:
            if part.hf_module.rsplit(".", 1)[-1] not in target_modules:
                continue
            in_local, out_local = linear.local_in_features(part, tp_size), linear.local_out_features(part, tp_size)
            for matrix, shape in (("A", (rank, in_local)), ("B", (out_local, rank))):
                key = peft_key(part, matrix)
                adapter.params[key] = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
                sharded_dim = {("column", "B"): 0, ("row", "A"): 1}.get((linear.kind, matrix))
                full_length = part.out_features if matrix == "B" else part.in_features
                adapter.sharding[key] = Sharding(sharded_dim, full_length)
    return adapter


class ActiveAdapter:
    """Which adapter the hooks of one base model apply right now (None: the plain base model)."""

    def __init__(self) -> None:
        self.adapter: LocalAdapter | None = None


class LoraHook:
    """forward hook of one megatron parallel linear: output (y, bias) -> (y + B(scale·A(x)), bias), in fp32 like
    PEFT (the scale is applied to the rank-r activation, the cheapest place)."""

    def __init__(self, linear: ParallelLinear, active: ActiveAdapter, tp_size: int):
        self.linear = linear
        self.active = active
        self.tp_size = tp_size
        self.keys = [(peft_key(part, "A"), peft_key(part, "B")) for part in linear.parts]
        self.local_widths = [linear.local_out_features(part, tp_size) for part in linear.parts]

    def __call__(self, module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
        adapter = self.active.adapter
        if adapter is None or not any(a in adapter.params for a, _ in self.keys):
            return output
        base_out, bias = output
        x = args[0].to(torch.float32)
        delta = self._column_delta(adapter, x) if self.linear.kind == "column" else self._row_delta(adapter, x)
        return base_out + delta.to(base_out.dtype), bias

    def _column_delta(self, adapter: LocalAdapter, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        present = [(a, b) for a, b in self.keys if a in adapter.params]
        low_rank = F.linear(x, torch.cat([adapter.params[a] for a, _ in present])) * adapter.scale  # [.., parts*r]
        low_rank = copy_to_tensor_model_parallel_region(low_rank)  # backward: sum the gradient over TP ranks
        # One block matrix maps every part's r columns to that part's rows in the fused (interleaved) order, so
        # the delta comes out of a single matmul already laid out like the base output.
        blocks, column = [], 0
        for (a, b), width in zip(self.keys, self.local_widths, strict=True):
            if a in adapter.params:
                blocks.append(F.pad(adapter.params[b], (column, low_rank.shape[-1] - column - adapter.rank)))
                column += adapter.rank
            else:
                blocks.append(x.new_zeros(width, low_rank.shape[-1]))
        return F.linear(low_rank, interleave(blocks, self.linear.local_groups(self.tp_size), dim=0))

    def _row_delta(self, adapter: LocalAdapter, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        ((a, b),) = self.keys
        low_rank = reduce_from_tensor_model_parallel_region(F.linear(x, adapter.params[a]) * adapter.scale)
        return F.linear(low_rank, adapter.params[b])


def attach_hooks(model: torch.nn.Module, linears: list[ParallelLinear], tp_size: int) -> ActiveAdapter:
    """Hook every LoRA-capable linear of `model` once; returns the switch that selects the active adapter."""
    active = ActiveAdapter()
    modules = dict(model.named_modules())
    for linear in linears:
        modules[linear.megatron_module].register_forward_hook(LoraHook(linear, active, tp_size))
    return active


def set_local_values(adapter: LocalAdapter, full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Copy PEFT-shaped tensors into this rank's shards (names and shapes checked by the caller)."""
    with torch.no_grad():
        for key, param in adapter.params.items():
            param.copy_(adapter.local_view(key, full[key], tp_rank, tp_size).to(param.device, param.dtype))
