"""Attention over the paged KV cache: K/V of layer l live in [pages, page_size, kv_heads, head_dim] tensors and
each sequence names its pages in a block table.

Prefill: the new tokens of a few prompts (padded to one length) attend to their pages (cached prefix + new) with
torch's SDPA over the gathered pages. Decode, one new token per row: on CUDA a Triton kernel that walks each
row's pages up to its own length only (no mask over a static maximum, nothing read past the filled length);
elsewhere the same maths in torch over the batch's longest row.

When rows x kv heads programs are too few to fill the GPU (small batches), the decode kernel splits each row's
positions over several programs (flash-decoding): each writes its part's normalised output and log-sum-exp, and
a small kernel combines them. How many splits depends only on static shapes (rows, kv heads, block-table width)
and the SM count, so a captured CUDA graph stays valid; where each split starts is computed in the kernel from
the row's length, read from device memory like the block table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sampler_consumer.kernel_grid import sm_count

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
    def _split_range(length, split, splits, BLOCK_T: tl.constexpr):
        """Positions [start, end) of `split` of a row of `length`: whole BLOCK_T blocks, evenly shared; the last
        splits of a short row are empty (start >= end)."""
        chunk = tl.cdiv(tl.cdiv(length, BLOCK_T), splits) * BLOCK_T
        start = split * chunk
        return start, tl.minimum(start + chunk, length)

    @triton.jit
    def _query_group(q_row_ptr, kv_head, stride_qh, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
        """The query heads sharing `kv_head`, padded to GROUP_PAD rows (the tensor cores' minimum of 16): their
        indices, which are real, and q [GROUP_PAD, D] (zeros in the padding)."""
        g = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + g
        q = tl.load(q_row_ptr + heads[:, None] * stride_qh + tl.arange(0, HEAD_DIM)[None, :], mask=(g < GROUP)[:, None],
                    other=0.0)
        return heads, g < GROUP, q

    @triton.jit
    def _attend_block(q, m, denom, acc, k_ptr, v_ptr, row_table_ptr, kv_offset, t0, end, scale, stride_kp,
                      stride_kt, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
                      PRECISION: tl.constexpr):
        """One online-softmax step: q [GROUP_PAD, D] against positions [t0, t0 + BLOCK_T) below `end`, gathered
        through the row's block table; returns the updated running max, denominator and accumulator."""
        pos = t0 + tl.arange(0, BLOCK_T)
        d = tl.arange(0, HEAD_DIM)
        ok = pos < end
        page = tl.load(row_table_ptr + pos // PAGE, mask=ok, other=0)
        where = page * stride_kp + (pos % PAGE) * stride_kt + kv_offset
        k = tl.load(k_ptr + where[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_T]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + where[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, denom * alpha + tl.sum(p, axis=1), acc

    @triton.jit
    def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, scale, stride_qb, stride_qh,
                      stride_kp, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh, stride_os,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_T: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        """One program per (row, kv head, split): the query heads sharing that kv head (padded to 16 rows for the
        tensor cores) against BLOCK_T positions at a time of the split's range, gathered through the block table;
        online softmax. SPLIT: write the part's normalised output [rows, heads, splits, D] and its log-sum-exp
        [rows, heads, splits] (an empty part writes nothing); else the output itself."""
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + row)
        start, end = _split_range(length, split, tl.num_programs(2), BLOCK_T)
        heads, g_ok, q = _query_group(q_ptr + row * stride_qb, kv_head, stride_qh, GROUP, GROUP_PAD, HEAD_DIM)
        d = tl.arange(0, HEAD_DIM)
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):  # bounds from device data: one graph serves any lengths
            m, denom, acc = _attend_block(q, m, denom, acc, k_ptr, v_ptr, table_ptr + row * stride_tb,
                                          kv_head * stride_kh, t0, end, scale, stride_kp, stride_kt, HEAD_DIM, PAGE,
                                          BLOCK_T, PRECISION)
        denom = tl.where(denom > 0, denom, 1.0)  # an empty part (not stored) divides by 1, not 0
        out = acc / denom[:, None]
        store = g_ok & (heads * 0 + start < end)  # broadcast by hand: the interpreter rejects scalar & vector masks
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=store[:, None])
        if SPLIT:
            tl.store(lse_ptr + (row * tl.num_programs(1) * GROUP + heads) * tl.num_programs(2) + split,
                     m + tl.log(denom), mask=store)

    @triton.jit
    def _combine(part_ptr, lse_ptr, lens_ptr, out_ptr, splits, stride_ob, stride_oh, HEAD_DIM: tl.constexpr,
                 SPLITS_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program per (row, head): its non-empty parts (the same split ranges, from the row's length)
        weighted by exp(log-sum-exp - the largest)."""
        row = tl.program_id(0)
        head = tl.program_id(1)
        length = tl.load(lens_ptr + row)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        start, end = _split_range(length, s, splits, BLOCK_T)
        used = (s < splits) & (start < end)
        first = (row * tl.num_programs(1) + head) * splits
        lse = tl.load(lse_ptr + first + s, mask=used, other=float("-inf"))
        weight = tl.exp(lse - tl.max(lse, axis=0))  # part 0 is never empty (length >= 1): the max is finite
        part = tl.load(part_ptr + (first + s)[:, None] * HEAD_DIM + d[None, :], mask=used[:, None], other=0.0)
        out = tl.sum(weight[:, None] * part, axis=0) / tl.sum(weight, axis=0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


_BLOCK_T = 64  # positions per step of the decode loop
# Split rows only while there are fewer (row, kv head) programs than SMs. Measured on an H200 (bench_kernels.py,
# docs/benchmarks.md): at 64 and 256 rows of Llama's 8 KV heads, positions 96-1024, one part per row was always
# the fastest; the split's extra reads and its combine kernel only pay when most SMs would otherwise idle.
_PROGRAMS_PER_SM = 1
_MAX_SPLITS = 16


def decode_splits(rows: int, kv_heads: int, max_positions: int, sms: int) -> int:
    """Programs sharing one (row, kv head): 1 when rows x kv_heads programs already fill the GPU, else the power
    of two that brings them to _PROGRAMS_PER_SM per SM, at most one per BLOCK_T positions of the longest row the
    block table can hold. Static shapes only, so a captured graph's grid stays right."""
    splits = 1
    while (splits < _MAX_SPLITS and rows * kv_heads * splits < _PROGRAMS_PER_SM * sms
           and splits * _BLOCK_T < max_positions):
        splits *= 2
    return splits


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            splits: int | None = None) -> torch.Tensor:
    """decode_attention_torch's result from the paged decode kernel; `splits` overrides decode_splits."""
    rows, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    if splits is None:
        splits = decode_splits(rows, kv_heads, block_table.shape[1] * page, sm_count(q.device))
    out = torch.empty_like(q)
    # One part per split; the parts and their log-sum-exps are never zero-filled: empty parts are not read.
    parts = torch.empty(rows, heads, splits, head_dim, device=q.device, dtype=torch.float32) if splits > 1 else out
    lse = torch.empty(rows, heads, splits, device=q.device, dtype=torch.float32) if splits > 1 else out
    _paged_decode[(rows, kv_heads, splits)](
        q, k_cache, v_cache, block_table, seq_lens, parts, lse, scale, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_table.stride(0), parts.stride(0), parts.stride(1),
        parts.stride(2) if splits > 1 else 0, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PAGE=page, BLOCK_T=_BLOCK_T, SPLIT=splits > 1,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    if splits > 1:
        _combine[(rows, heads)](parts, lse, seq_lens, out, splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                                SPLITS_PAD=triton.next_power_of_2(splits), BLOCK_T=_BLOCK_T)
    return out
