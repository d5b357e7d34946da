"""The sampler's Triton kernels as they were before issue 13's kernel pass (main bed694d), kept only as
bench_kernels.py's baseline: the LoRA shrink split its input over programs with fp32 atomics into a zero-filled
h (a memset per call), the expand added one 64-column block per program, and the paged decode kernel ran one
program per (row, kv head) over a while loop (which Triton does not software-pipeline)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sampler_consumer.attention import _attend_block, _query_group
from sampler_consumer.lora_kernels import _BLOCK_K, _BLOCK_N, TILE_M, _precision, _shrink_block, _tile

_SPLIT_K_WIDTH = 512  # input columns per shrink program


@triton.jit
def _shrink(x_ptr, a_ptr, h_ptr, tiles_ptr, n_tiles, in_features, stride_x, stride_as, stride_ar, stride_h,
            RANK: tl.constexpr, TILE: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr,
            PRECISION: tl.constexpr):
    rows, row_ok, slot, filled = _tile(tiles_ptr, n_tiles, TILE)
    if slot != 0 and filled:
        ranks = tl.arange(0, RANK)
        acc = tl.zeros((TILE, RANK), dtype=tl.float32)
        k_first = tl.program_id(1) * WIDTH
        for k0 in range(0, WIDTH, BLOCK_K):
            acc += _shrink_block(x_ptr, a_ptr + slot * stride_as, rows, row_ok, ranks,
                                 k_first + k0 + tl.arange(0, BLOCK_K), in_features, stride_x, stride_ar, PRECISION)
        tl.atomic_add(h_ptr + rows[:, None] * stride_h + ranks[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _expand(h_ptr, b_ptr, out_ptr, tiles_ptr, n_tiles, out_features, stride_h, stride_bs, stride_bn, stride_o,
            RANK: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    rows, row_ok, slot, filled = _tile(tiles_ptr, n_tiles, TILE)
    if slot != 0 and filled:
        ranks = tl.arange(0, RANK)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        h = tl.load(h_ptr + rows[:, None] * stride_h + ranks[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + ranks[:, None], mask=col_ok[None, :],
                    other=0.0)
        delta = tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
        where = out_ptr + rows[:, None] * stride_o + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        old = tl.load(where, mask=ok, other=0.0)
        tl.store(where, (old.to(tl.float32) + delta).to(old.dtype), mask=ok)


def lora(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, tiles: torch.Tensor,
         out: torch.Tensor) -> None:
    """out += per-tile x @ A[slot]^T @ B[slot]^T: zeroed h, atomic shrink, expand."""
    tokens, in_features = x.shape
    out_features, rank = b_stack.shape[1], b_stack.shape[2]
    h = torch.zeros(tokens, rank, device=x.device, dtype=torch.float32)
    n_tiles = tiles.shape[1]
    _shrink[(n_tiles, triton.cdiv(in_features, _SPLIT_K_WIDTH))](
        x, a_stack, h, tiles, n_tiles, in_features, x.stride(0), a_stack.stride(0), a_stack.stride(1), h.stride(0),
        RANK=rank, TILE=TILE_M, BLOCK_K=_BLOCK_K, WIDTH=_SPLIT_K_WIDTH, PRECISION=_precision(x))
    _expand[(n_tiles, triton.cdiv(out_features, _BLOCK_N))](
        h, b_stack, out, tiles, n_tiles, out_features, h.stride(0), b_stack.stride(0), b_stack.stride(1),
        out.stride(0), RANK=rank, TILE=TILE_M, BLOCK_N=_BLOCK_N, PRECISION=_precision(b_stack))


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, scale, stride_qb, stride_qh,
                  stride_kp, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + row)
    heads, g_ok, q = _query_group(q_ptr + row * stride_qb, kv_head, stride_qh, GROUP, GROUP_PAD, HEAD_DIM)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    t0 = 0
    while t0 < length:
        m, denom, acc = _attend_block(q, m, denom, acc, k_ptr, v_ptr, table_ptr + row * stride_tb,
                                      kv_head * stride_kh, t0, length, scale, stride_kp, stride_kt, HEAD_DIM, PAGE,
                                      BLOCK_T, PRECISION)
        t0 += BLOCK_T
    out = acc / denom[:, None]
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
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
