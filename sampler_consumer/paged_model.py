"""A Llama-family decoder run over the paged KV cache, reusing the loaded transformers modules (their weights,
norms, MLPs and the LoRA-wrapped projections) with its own attention and KV bookkeeping.

Tokens come as [rows, L] (prefill, padded) or [rows] (decode, one token each); each token's K/V is written to its
cache position (`slots`, a flat page * page_size + offset) before attention reads the pages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sampler_consumer.attention import decode_attention_torch, decode_attention_triton, prefill_attention, triton
from sampler_consumer.fused_kernels import (
    add_rms_norm_torch,
    add_rms_norm_triton,
    rotary_write_kv_torch,
    rotary_write_kv_triton,
)
from sampler_consumer.models import BaseModel

log = logging.getLogger(__name__)
SUPPORTED = ("llama", "qwen2", "qwen3")  # pre-norm decoders with rotary q/k and a gated MLP: the same forward


@dataclass
class PrefillMeta:
    block_table: torch.Tensor  # [n, pages] int32
    starts: torch.Tensor  # [n] first position computed (before it: cached pages)
    lengths: torch.Tensor  # [n] prompt lengths


@dataclass
class DecodeMeta:
    block_table: torch.Tensor  # [B, pages] int32
    seq_lens: torch.Tensor  # [B] int32, including the token fed now


class PagedModel:
    def __init__(self, base: BaseModel, num_pages: int, page_size: int, max_len: int, *, triton_attention: bool):
        config = base.model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"the sampler serves {', '.join(SUPPORTED)} models, not {config.model_type!r}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported by the sampler")
        self.base = base
        inner = base.model.model
        self.embed, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.head = base.model.get_output_embeddings()
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scale = attn.scaling
        self.page_size = page_size
        shape = (num_pages, page_size, self.kv_heads, self.head_dim)
        device, dtype = base.device, base.dtype
        self.k_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        # cos/sin of every position, from the model's own rotary module (its scaling rules included), once.
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        self.decode_attention = decode_attention_torch
        if triton_attention and triton is not None:
            try:  # compile it now, for this head geometry: a kernel that cannot build must not fail requests
                self.k_cache[0][1].normal_()
                self.v_cache[0][1].normal_()
                probe_q = torch.randn(2, self.heads, self.head_dim, device=device, dtype=dtype)
                table = torch.ones(2, 1, device=device, dtype=torch.int32)
                lens = torch.tensor([1, page_size], device=device, dtype=torch.int32)
                args = (probe_q, self.k_cache[0], self.v_cache[0], table, lens, self.scale)
                for splits in (1, 2):  # the unsplit kernel, and the split one + its combine (small batches)
                    torch.testing.assert_close(decode_attention_triton(*args, splits=splits),
                                               decode_attention_torch(*args), atol=5e-2, rtol=5e-2)
                self.decode_attention = decode_attention_triton
            except Exception:
                log.exception("the Triton paged-attention kernel failed its self-check; using torch attention")
            finally:
                self.k_cache[0][1].zero_()
                self.v_cache[0][1].zero_()
        self.add_norm = add_rms_norm_torch
        self.fused_rotary = False
        if triton_attention and triton is not None:
            try:
                self._check_fused_kernels()
                self.add_norm, self.fused_rotary = add_rms_norm_triton, True
            except Exception:
                log.exception("the fused norm / rotary kernels failed their self-check; using torch")

    def _check_fused_kernels(self) -> None:
        """Both fused kernels against their torch code on random values of this model's shapes (and that they
        compile for them at all), on scratch caches."""
        device, dtype = self.cos.device, self.cos.dtype
        norm = self.layers[0].input_layernorm
        hidden = torch.randn(3, norm.weight.shape[0], device=device, dtype=dtype)
        delta = torch.randn_like(hidden)
        for got, want in zip(add_rms_norm_triton(hidden, delta, norm), add_rms_norm_torch(hidden, delta, norm),
                             strict=True):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
        q = torch.randn(3, self.heads, self.head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(3, self.kv_heads, self.head_dim, device=device, dtype=dtype) for _ in range(2))
        positions = torch.tensor([0, 5, 2], device=device)
        slots = torch.tensor([1, 2, 3], device=device)
        caches = [torch.zeros(2, self.page_size, self.kv_heads, self.head_dim, device=device, dtype=dtype)
                  for _ in range(4)]
        got = rotary_write_kv_triton(q, k, v, positions, self.cos, self.sin, caches[0], caches[1], slots)
        want = rotary_write_kv_torch(q, k, v, self.cos[positions], self.sin[positions], caches[2], caches[3], slots)
        for a, b in ((got, want), (caches[0], caches[2]), (caches[1], caches[3])):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * self.k_cache[0].element_size()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                meta: PrefillMeta | DecodeMeta) -> torch.Tensor:
        """Final-norm hidden states, shaped like `tokens` + [hidden]."""
        hidden = self.embed(tokens)
        rope = None if self.fused_rotary else (self.cos[positions], self.sin[positions])  # cos, sin [..., D]
        lead = tokens.shape
        delta: torch.Tensor | None = None  # the previous layer's MLP output, not yet added to the residual
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            hidden, x = self.add_norm(hidden, delta, layer.input_layernorm)
            q = attn.q_proj(x).view(*lead, self.heads, self.head_dim)
            k = attn.k_proj(x).view(*lead, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(*lead, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is None:
                q = rotary_write_kv_triton(q, k, v, positions, self.cos, self.sin, self.k_cache[i],
                                           self.v_cache[i], slots)
            else:
                q = rotary_write_kv_torch(q, k, v, *rope, self.k_cache[i], self.v_cache[i], slots)
            if isinstance(meta, PrefillMeta):
                o = prefill_attention(q, self.k_cache[i], self.v_cache[i], meta.block_table, meta.starts,
                                      meta.lengths, self.scale)
            else:
                o = self.decode_attention(q, self.k_cache[i], self.v_cache[i], meta.block_table, meta.seq_lens,
                                          self.scale)
            hidden, x = self.add_norm(hidden, attn.o_proj(o.reshape(*lead, self.heads * self.head_dim)),
                                      layer.post_attention_layernorm)
            delta = layer.mlp(x)
        return self.add_norm(hidden, delta, self.norm)[1]

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Page dst[i] of every layer's K and V becomes a copy of page src[i]."""
        for cache in (*self.k_cache, *self.v_cache):
            cache.index_copy_(0, dst, cache.index_select(0, src))
