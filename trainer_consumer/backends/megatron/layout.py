"""Where each HF projection lives inside megatron's (fused, tensor-parallel) linear layers.

megatron fuses q/k/v into `linear_qkv` (per KV group: that group's q heads, then its k head, then its v head) and
gate/up into `linear_fc1` ([gate; up]). Under TP each rank holds whole KV groups of `linear_qkv` and a slice of
gate plus the matching slice of up in `linear_fc1`, i.e. its local fused rows are "shard every part, then fuse".
The same description drives the base-weight conversion and the LoRA layout, so the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from trainer_consumer.backends.megatron.config import ModelShape
from trainer_consumer.backends.megatron.parallel import shard


@dataclass(frozen=True)
class Part:
    hf_module: str  # e.g. "model.layers.0.self_attn.q_proj"
    out_features: int  # full (unsharded) output width of this projection
    in_features: int


@dataclass(frozen=True)
class ParallelLinear:
    """One megatron linear and the HF projections it holds. Column-parallel linears split output rows over TP
    ranks; row-parallel ones split input columns and all-reduce their output."""

    megatron_module: str  # e.g. "decoder.layers.0.self_attention.linear_qkv"
    parts: tuple[Part, ...]
    kind: Literal["column", "row"]
    groups: int = 1  # the fused output interleaves its parts per group (the KV groups of linear_qkv)

    def fuse(self, full_parts: Sequence[torch.Tensor], rank: int, size: int) -> torch.Tensor:
        """This rank's fused tensor (weight or bias: rows along dim 0) from the full per-projection tensors."""
        if self.kind == "row":
            (full,) = full_parts
            return shard(full, 1, rank, size)
        return interleave([shard(t, 0, rank, size) for t in full_parts], self.local_groups(size), dim=0)

    def split(self, local_fused: torch.Tensor, size: int) -> list[torch.Tensor]:
        """Inverse of `fuse` on one rank: this rank's slice of every projection (column-parallel only)."""
        widths = [self.local_out_features(part, size) for part in self.parts]
        return deinterleave(local_fused, widths, self.local_groups(size), dim=0)

    def local_groups(self, size: int) -> int:
        return self.groups // size if self.groups > 1 else 1

    def local_out_features(self, part: Part, size: int) -> int:
        return -(-part.out_features // size) if self.kind == "column" else part.out_features

    def local_in_features(self, part: Part, size: int) -> int:
        return part.in_features // size if self.kind == "row" else part.in_features


def interleave(parts: Sequence[torch.Tensor], groups: int, dim: int) -> torch.Tensor:
    """cat per group along `dim`: [p0 of group 0, p1 of group 0, ..., p0 of group 1, ...]."""
    if groups == 1:
        return torch.cat(list(parts), dim=dim)
    dim = dim % parts[0].dim()
    grouped = [t.unflatten(dim, (groups, t.shape[dim] // groups)) for t in parts]
    return torch.cat(grouped, dim=dim + 1).flatten(dim, dim + 1)


def deinterleave(fused: torch.Tensor, widths: Sequence[int], groups: int, dim: int) -> list[torch.Tensor]:
    if groups == 1:
        return list(fused.split(list(widths), dim=dim))
    dim = dim % fused.dim()
    grouped = fused.unflatten(dim, (groups, fused.shape[dim] // groups))
    pieces = grouped.split([w // groups for w in widths], dim=dim + 1)
    return [piece.flatten(dim, dim + 1) for piece in pieces]


def layer_linears(shape: ModelShape, layer: int) -> list[ParallelLinear]:
    hf, mc = f"model.layers.{layer}", f"decoder.layers.{layer}"
    h, d, ffn = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    return [
        ParallelLinear(f"{mc}.self_attention.linear_qkv", (
            Part(f"{hf}.self_attn.q_proj", shape.num_heads * d, h),
            Part(f"{hf}.self_attn.k_proj", shape.num_kv_heads * d, h),
            Part(f"{hf}.self_attn.v_proj", shape.num_kv_heads * d, h),
        ), "column", groups=shape.num_kv_heads),
        ParallelLinear(f"{mc}.self_attention.linear_proj", (Part(f"{hf}.self_attn.o_proj", h, shape.num_heads * d),),
                       "row"),
        ParallelLinear(f"{mc}.mlp.linear_fc1", (Part(f"{hf}.mlp.gate_proj", ffn, h), Part(f"{hf}.mlp.up_proj", ffn, h)),
                       "column"),
        ParallelLinear(f"{mc}.mlp.linear_fc2", (Part(f"{hf}.mlp.down_proj", h, ffn),), "row"),
    ]


def unembedding(shape: ModelShape) -> ParallelLinear:
    return ParallelLinear("output_layer", (Part("lm_head", shape.vocab_size, shape.hidden_size),), "column")


def all_linears(shape: ModelShape) -> list[ParallelLinear]:
    linears = [linear for layer in range(shape.num_layers) for linear in layer_linears(shape, layer)]
    return [*linears, unembedding(shape)]
