"""Segmented gather-matmul LoRA kernels (Punica SGMV style) in Triton, for CUDA.

The batch's tokens are grouped by adapter slot into tiles of at most TILE_M tokens (start, end, slot). Shrink:
h[tile] = x[tile] @ A[slot]^T, split over the input dimension (fp32 atomics into a zeroed h). Expand:
out[tile] += h[tile] @ B[slot]^T. Each tile reads only its own adapter, rows of slot 0 (no adapter) are skipped,
and the grid size depends only on the batch's bucket, so one CUDA graph serves any mix of adapters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_M = 16
_BLOCK_K = 64
_BLOCK_N = 64
_SPLIT_K_WIDTH = 512  # input columns per shrink program


def max_tiles(tokens: int, slots: int) -> int:
    """Tiles a batch of `tokens` can need: its TILE_M blocks plus one extra cut per adapter boundary."""
    return -(-tokens // TILE_M) + slots


def build_tiles(segments: list[tuple[int, int, int]], capacity: int | None = None) -> list[list[int]]:
    """(starts, ends, slots) of the tiles of `segments`, padded with empty tiles to `capacity` (a graph's fixed
    grid; its batch is sorted by slot, so max_tiles bounds it), or exactly as many as needed (None)."""
    starts, ends, slots = [], [], []
    for start, end, slot in segments:
        if not slot:
            continue
        for s in range(start, end, TILE_M):
            starts.append(s)
            ends.append(min(end, s + TILE_M))
            slots.append(slot)
    capacity = len(starts) if capacity is None else capacity
    if len(starts) > capacity:
        raise ValueError(f"{len(starts)} LoRA tiles > capacity {capacity}")
    pad = capacity - len(starts)
    return [starts + [0] * pad, ends + [0] * pad, slots + [0] * pad]


@triton.jit
def _tile(tiles_ptr, n_tiles, TILE: tl.constexpr):
    """This program's tile of the (start, end, slot) table: its token rows, which of them are real, its adapter
    slot (0: none) and whether it holds any token."""
    tile = tl.program_id(0)
    start = tl.load(tiles_ptr + tile)
    end = tl.load(tiles_ptr + n_tiles + tile)
    slot = tl.load(tiles_ptr + 2 * n_tiles + tile)
    rows = start + tl.arange(0, TILE)
    return rows, rows < end, slot, start < end


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
            cols = k_first + k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + slot * stride_as + ranks[None, :] * stride_ar + cols[:, None], mask=col_ok[:, None],
                        other=0.0)
            acc += tl.dot(x, a, input_precision=PRECISION)
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


def _precision(t: torch.Tensor) -> str:
    """fp32 stays fp32 (tests compare to 1e-5); bf16 / fp16 multiply natively on the tensor cores either way."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """h [T, R] fp32 = per-tile x @ A[slot]^T (rows of no tile stay zero)."""
    tokens, in_features = x.shape
    rank = a_stack.shape[1]
    h = torch.zeros(tokens, rank, device=x.device, dtype=torch.float32)
    n_tiles = tiles.shape[1]
    grid = (n_tiles, triton.cdiv(in_features, _SPLIT_K_WIDTH))
    _shrink[grid](x, a_stack, h, tiles, n_tiles, in_features, x.stride(0), a_stack.stride(0), a_stack.stride(1),
                  h.stride(0), RANK=rank, TILE=TILE_M, BLOCK_K=_BLOCK_K, WIDTH=_SPLIT_K_WIDTH,
                  PRECISION=_precision(x))
    return h


def sgmv_expand(h: torch.Tensor, b_stack: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, out] += per-tile h @ B[slot]^T, in place."""
    out_features, rank = b_stack.shape[1], b_stack.shape[2]
    n_tiles = tiles.shape[1]
    grid = (n_tiles, triton.cdiv(out_features, _BLOCK_N))
    _expand[grid](h, b_stack, out, tiles, n_tiles, out_features, h.stride(0), b_stack.stride(0), b_stack.stride(1),
                  out.stride(0), RANK=rank, TILE=TILE_M, BLOCK_N=_BLOCK_N, PRECISION=_precision(b_stack))
