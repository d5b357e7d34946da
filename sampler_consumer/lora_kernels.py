"""Segmented gather-matmul LoRA kernels (Punica SGMV style) in Triton, for CUDA.

The batch's tokens are grouped by adapter slot into tiles of at most TILE_M tokens (start, end, slot).
Shrink: h[tile] = x[tile] @ A[slot]^T, split over the input dimension for parallelism (a decode batch has only a
few tiles): split s writes its partial product to its own plane of a [splits, T, R] fp32 buffer. Expand:
out[tile] += (sum over s of the partials)[tile] @ B[slot]^T, in place. Nothing is zero-filled and nothing is
atomic: every (split, row of a tile) is written exactly once by the shrink, and the expand reads only those
rows, so rows outside every tile (slot 0) may hold anything. Each tile reads only its own adapter, tiles of slot
0 return at once, and both grids depend only on the tile table's capacity (the batch's bucket), the layer's
dimensions and the SM count, so one CUDA graph serves any mix of adapters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sampler_consumer.kernel_grid import sm_count

TILE_M = 16
_BLOCK_K = 64
_BLOCK_N = 64
# Programs per SM each kernel aims for: enough memory requests in flight to hide DRAM latency on a few tiles.
_PROGRAMS_PER_SM = 4
# At most this many partial planes: the expand sums them once per program, so more splits cost it L2 reads.
# 8: the fastest forced count per layer in most shapes measured on an H200 (bench_kernels.py, docs/benchmarks.md).
_MAX_SPLITS = 8


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


def shrink_splits(n_tiles: int, in_features: int, sms: int) -> tuple[int, int]:
    """(splits, input columns per split): enough splits that n_tiles x splits programs fill the GPU, each split a
    whole number of BLOCK_K columns and none empty."""
    k_blocks = triton.cdiv(in_features, _BLOCK_K)
    wanted = max(1, min(_MAX_SPLITS, k_blocks, triton.cdiv(_PROGRAMS_PER_SM * sms, n_tiles)))
    per_split = triton.cdiv(k_blocks, wanted)
    return triton.cdiv(k_blocks, per_split), per_split * _BLOCK_K


def expand_span(n_tiles: int, out_features: int, sms: int) -> int:
    """Output columns per expand program: as wide as the GPU allows, since each program first sums its tile's
    partials (fewer, wider programs read them fewer times)."""
    n_blocks = triton.cdiv(out_features, _BLOCK_N)
    programs_per_tile = max(1, min(n_blocks, triton.cdiv(_PROGRAMS_PER_SM * sms, n_tiles)))
    return triton.cdiv(n_blocks, programs_per_tile) * _BLOCK_N


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
def _shrink_block(x_ptr, a_slot_ptr, rows, row_ok, ranks, cols, in_features, stride_x, stride_ar,
                  PRECISION: tl.constexpr):
    """x[rows, cols] @ A[slot][:, cols]^T: one BLOCK_K step of the shrink, [TILE, RANK] fp32."""
    col_ok = cols < in_features
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    a = tl.load(a_slot_ptr + ranks[None, :] * stride_ar + cols[:, None], mask=col_ok[:, None], other=0.0)
    return tl.dot(x, a, input_precision=PRECISION)


@triton.jit
def _shrink(x_ptr, a_ptr, part_ptr, tiles_ptr, n_tiles, in_features, width, stride_x, stride_as, stride_ar,
            stride_ps, stride_p, RANK: tl.constexpr, TILE: tl.constexpr, BLOCK_K: tl.constexpr,
            PRECISION: tl.constexpr):
    """Program (tile, split): the tile's rows times A[slot] over input columns [split * width, + width)."""
    rows, row_ok, slot, filled = _tile(tiles_ptr, n_tiles, TILE)
    if slot != 0 and filled:
        split = tl.program_id(1)
        ranks = tl.arange(0, RANK)
        acc = tl.zeros((TILE, RANK), dtype=tl.float32)
        k_first = split * width
        for k0 in range(k_first, k_first + width, BLOCK_K):
            acc += _shrink_block(x_ptr, a_ptr + slot * stride_as, rows, row_ok, ranks, k0 + tl.arange(0, BLOCK_K),
                                 in_features, stride_x, stride_ar, PRECISION)
        tl.store(part_ptr + split * stride_ps + rows[:, None] * stride_p + ranks[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _expand(part_ptr, b_ptr, out_ptr, tiles_ptr, n_tiles, splits, out_features, span, stride_ps, stride_p,
            stride_bs, stride_bn, stride_o, RANK: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
            PRECISION: tl.constexpr):
    """Program (tile, column span): h = the tile's partials summed, then out[rows, span] += h @ B[slot]^T."""
    rows, row_ok, slot, filled = _tile(tiles_ptr, n_tiles, TILE)
    if slot != 0 and filled:
        ranks = tl.arange(0, RANK)
        h = tl.zeros((TILE, RANK), dtype=tl.float32)
        for s in range(0, splits):
            h += tl.load(part_ptr + s * stride_ps + rows[:, None] * stride_p + ranks[None, :], mask=row_ok[:, None],
                         other=0.0)
        h_in = h.to(b_ptr.dtype.element_ty)
        n_first = tl.program_id(1) * span
        for n0 in range(n_first, n_first + span, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < out_features
            b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + ranks[:, None], mask=col_ok[None, :],
                        other=0.0)
            delta = tl.dot(h_in, b, input_precision=PRECISION)
            where = out_ptr + rows[:, None] * stride_o + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            old = tl.load(where, mask=ok, other=0.0)
            tl.store(where, (old.to(tl.float32) + delta).to(old.dtype), mask=ok)


def _precision(t: torch.Tensor) -> str:
    """fp32 stays fp32 (tests compare to 1e-5); bf16 / fp16 multiply natively on the tensor cores either way."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def sgmv_shrink(x: torch.Tensor, a_stack: torch.Tensor, tiles: torch.Tensor,
                splits: int | None = None) -> torch.Tensor:
    """Partials [splits, T, R] fp32 of per-tile x @ A[slot]^T (summed by sgmv_expand); rows of no tile are left
    unwritten. `splits` overrides the SM-count-based choice (tests, benchmarks)."""
    tokens, in_features = x.shape
    rank = a_stack.shape[1]
    n_tiles = tiles.shape[1]
    n_splits, width = shrink_splits(n_tiles, in_features, sm_count(x.device))
    if splits is not None:
        width = triton.cdiv(triton.cdiv(in_features, _BLOCK_K), splits) * _BLOCK_K
        n_splits = splits  # a split past in_features writes zeros: still summed correctly
    partials = torch.empty(n_splits, tokens, rank, device=x.device, dtype=torch.float32)
    _shrink[(n_tiles, n_splits)](
        x, a_stack, partials, tiles, n_tiles, in_features, width, x.stride(0), a_stack.stride(0),
        a_stack.stride(1), partials.stride(0), partials.stride(1), RANK=rank, TILE=TILE_M, BLOCK_K=_BLOCK_K,
        PRECISION=_precision(x))
    return partials


def sgmv_expand(partials: torch.Tensor, b_stack: torch.Tensor, tiles: torch.Tensor, out: torch.Tensor,
                span: int | None = None) -> None:
    """out [T, out] += per-tile (sum of sgmv_shrink's partials) @ B[slot]^T, in place. `span` (a multiple of
    64) overrides the output columns per program."""
    out_features, rank = b_stack.shape[1], b_stack.shape[2]
    n_tiles = tiles.shape[1]
    span = span or expand_span(n_tiles, out_features, sm_count(out.device))
    if span % _BLOCK_N:  # a program's last block would spill into its neighbour's columns and add there twice
        raise ValueError(f"span {span} is not a multiple of {_BLOCK_N} columns")
    _expand[(n_tiles, triton.cdiv(out_features, span))](
        partials, b_stack, out, tiles, n_tiles, partials.shape[0], out_features, span, partials.stride(0),
        partials.stride(1), b_stack.stride(0), b_stack.stride(1), out.stride(0), RANK=rank, TILE=TILE_M,
        BLOCK_N=_BLOCK_N, PRECISION=_precision(b_stack))
