"""Attention over the paged KV cache: K/V of layer l live in [pages, page_size, kv_heads, head_dim] tensors and
each sequence names its pages in a block table.

Prefill: the new tokens of a few prompts (padded to one length) attend to their pages (cached prefix + new) with
torch's SDPA over the gathered pages. Decode, one new token per row: on CUDA a Triton kernel that walks each
row's pages up to its own length only (no mask over a static maximum, nothing read past the filled length);
elsewhere the same maths in torch over the batch's longest row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the GPU image has Triton; the CPU install need not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def write_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[page, offset] = values[t] for slots[t] = page * page_size + offset."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, values.reshape(-1, *cache.shape[2:]))


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[rows, pages * page_size, kv_heads, head_dim] of each row's pages in order."""
    rows, pages = block_table.shape
    return cache[block_table.long()].reshape(rows, pages * cache.shape[1], *cache.shape[2:])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      starts: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Lq, H, D] of positions starts[i] + j (j < lengths[i] - starts[i]) -> [n, Lq, H, D]."""
    keys, values = _gather(k_cache, block_table), _gather(v_cache, block_table)
    q_pos = starts[:, None] + torch.arange(q.shape[1], device=q.device)[None, :]  # [n, Lq]
    k_pos = torch.arange(keys.shape[1], device=q.device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < lengths[:, None, None])
    allowed[:, :, 0] = True  # padding queries (past the prompt) see one key instead of none: no NaN
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], each row attending to its first seq_lens[b] positions -> [B, H, D]."""
    keys, values = _gather(k_cache, block_table), _gather(v_cache, block_table)
    allowed = torch.arange(keys.shape[1], device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed[:, None, None], scale=scale, enable_gqa=True)
    return out[:, :, 0]


if triton is not None:

    @triton.jit
    def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, scale, stride_qb, stride_qh,
                      stride_kp, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
        """One program per (row, kv head): the query heads sharing that kv head (padded to 16 rows for the
        tensor cores) against BLOCK_T positions at a time, gathered through the block table; online softmax."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lens_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK_T)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        t0 = 0
        while t0 < length:  # a while loop: the bound is loaded data (Triton's interpreter needs this form too)
            pos = t0 + t
            ok = pos < length
            page = tl.load(table_ptr + row * stride_tb + pos // PAGE, mask=ok, other=0)
            where = page * stride_kp + (pos % PAGE) * stride_kt + kv_head * stride_kh
            k = tl.load(k_ptr + where[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_T]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            denom = denom * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + where[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
            t0 += BLOCK_T
        out = acc / denom[:, None]
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode[(rows, kv_heads)](
        q, k_cache, v_cache, block_table, seq_lens, out, scale, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_T=64, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out
