"""A Llama-family decoder run over the paged KV cache, reusing the loaded transformers modules (their weights,
norms, MLPs and the LoRA-wrapped projections) with its own attention and KV bookkeeping.

Tokens come as [rows, L] (prefill, padded) or [rows] (decode, one token each); each token's K/V is written to its
cache position (`slots`, a flat page * page_size + offset) before attention reads the pages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import rotate_half

from sampler_consumer.attention import (
    decode_attention_torch,
    decode_attention_triton,
    prefill_attention,
    triton,
    write_kv,
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
                torch.testing.assert_close(decode_attention_triton(*args), decode_attention_torch(*args),
                                           atol=5e-2, rtol=5e-2)
                self.decode_attention = decode_attention_triton
            except Exception:
                log.exception("the Triton paged-attention kernel failed its self-check; using torch attention")
            finally:
                self.k_cache[0][1].zero_()
                self.v_cache[0][1].zero_()

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * self.k_cache[0].element_size()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                meta: PrefillMeta | DecodeMeta) -> torch.Tensor:
        """Final-norm hidden states, shaped like `tokens` + [hidden]."""
        hidden = self.embed(tokens)
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)  # [..., 1, D]
        lead = tokens.shape
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(*lead, self.heads, self.head_dim)
            k = attn.k_proj(x).view(*lead, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(*lead, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            write_kv(self.k_cache[i], slots, k)
            write_kv(self.v_cache[i], slots, v)
            if isinstance(meta, PrefillMeta):
                o = prefill_attention(q, self.k_cache[i], self.v_cache[i], meta.block_table, meta.starts,
                                      meta.lengths, self.scale)
            else:
                o = self.decode_attention(q, self.k_cache[i], self.v_cache[i], meta.block_table, meta.seq_lens,
                                          self.scale)
            hidden = hidden + attn.o_proj(o.reshape(*lead, self.heads * self.head_dim))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.norm(hidden)

    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Page dst[i] of every layer's K and V becomes a copy of page src[i]."""
        for cache in (*self.k_cache, *self.v_cache):
            cache.index_copy_(0, dst, cache.index_select(0, src))
