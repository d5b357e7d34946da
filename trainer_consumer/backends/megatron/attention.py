"""Causal core attention through torch's scaled_dot_product_attention.

megatron-core's local DotProductAttention materialises the [b, heads, s, s] scores (softmax in fp32) and the fast
kernels live in Transformer Engine, which the GPU box cannot install (offline-models.md section 8). SDPA picks
flash / memory-efficient kernels on GPU and is exact math on CPU. The backend only runs causal decoder attention
over right-padded rows, so the causal flag replaces megatron's mask tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention_class() -> type:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SdpaAttention(DotProductAttention):
        """DotProductAttention's constructor (head counts per TP rank, softmax scale), SDPA's forward."""

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                    attn_mask_type=None, attention_bias=None, packed_seq_params=None, **unused) -> torch.Tensor:
            if attention_bias is not None or packed_seq_params is not None:
                raise NotImplementedError("SdpaAttention supports plain causal attention only")
            # megatron: [s, b, heads, d] (key/value with the KV-group count); SDPA: [b, heads, s, d].
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                     enable_gqa=q.shape[1] != k.shape[1])
            return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    return SdpaAttention
