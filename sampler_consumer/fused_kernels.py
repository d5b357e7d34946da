"""Fused per-token kernels of the sampler's forward (Triton, CUDA), each with the torch code it replaces.

A decode step of a 32-layer model otherwise runs ~20 tiny element-wise kernels per layer around the matmuls: the
RMSNorms (float cast, square, mean, rsqrt, two products, casts), the residual adds, the rotary embedding of q and
k (products, a concatenation for rotate_half, a sum) and the two K/V cache writes. Here each layer runs four: two
(residual add + RMSNorm) and one (rotary q/k + K/V cache write). Each kernel rounds where transformers' modules
round (the sum to the model dtype, the normalised value to the model dtype before the weight, rotary products
and their sum), so the values match the torch path to the last rounding of a reduction.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from sampler_consumer.attention import triton, write_kv

if triton is not None:
    import triton.language as tl


def add_rms_norm_torch(hidden: torch.Tensor, delta: torch.Tensor | None,
                       norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, norm(hidden + delta)); delta None: (hidden, norm(hidden))."""
    summed = hidden if delta is None else hidden + delta
    return summed, norm(summed)


def rotary_write_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q rotated; k rotated and v written to the caches at `slots`. q/k/v [..., heads, D], cos/sin [..., D]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    write_kv(k_cache, slots, k)
    write_kv(v_cache, slots, v)
    return q


if triton is not None:

    @triton.jit
    def _add_rms_norm(h_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(h_ptr + row * n + cols, mask=ok, other=0.0)
        if HAS_DELTA:
            x = (x.to(tl.float32) + tl.load(d_ptr + row * n + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * n + cols, x, mask=ok)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        normed = (xf * rstd).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * n + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)

    @triton.jit
    def _rotate(x_ptr, out_ptr, c1, c2, s1, s2, heads, HALF: tl.constexpr, HEADS: tl.constexpr):
        """out = x * cos + rotate_half(x) * sin for one token's [heads, 2 * HALF], rounding as torch does."""
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        ok = h < heads
        x1 = tl.load(x_ptr + h * 2 * HALF + d, mask=ok, other=0.0)
        x2 = tl.load(x_ptr + h * 2 * HALF + HALF + d, mask=ok, other=0.0)
        dt = x1.dtype
        first = (x1 * c1).to(dt).to(tl.float32) + (-(x2 * s1)).to(dt).to(tl.float32)
        second = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(out_ptr + h * 2 * HALF + d, first.to(dt), mask=ok)
        tl.store(out_ptr + h * 2 * HALF + HALF + d, second.to(dt), mask=ok)

    @triton.jit
    def _rotary_write_kv(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_out_ptr, k_cache_ptr,
                         v_cache_ptr, heads, kv_heads, stride_qt, stride_kt, stride_vt,
                         HALF: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr):
        token = tl.program_id(0)
        pos = tl.load(pos_ptr + token)
        slot = tl.load(slot_ptr + token)
        d = tl.arange(0, HALF)[None, :]
        c1 = tl.load(cos_ptr + pos * 2 * HALF + d)
        c2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + d)
        s1 = tl.load(sin_ptr + pos * 2 * HALF + d)
        s2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + d)
        _rotate(q_ptr + token * stride_qt, q_out_ptr + token * heads * 2 * HALF, c1, c2, s1, s2, heads,
                HALF, HEADS)
        row = slot * kv_heads * 2 * HALF
        _rotate(k_ptr + token * stride_kt, k_cache_ptr + row, c1, c2, s1, s2, kv_heads, HALF, KV_HEADS)
        h = tl.arange(0, KV_HEADS)[:, None]
        dv = tl.arange(0, 2 * HALF)[None, :]
        ok = h < kv_heads
        v = tl.load(v_ptr + token * stride_vt + h * 2 * HALF + dv, mask=ok, other=0.0)
        tl.store(v_cache_ptr + row + h * 2 * HALF + dv, v, mask=ok)


def add_rms_norm_triton(hidden: torch.Tensor, delta: torch.Tensor | None,
                        norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    n = hidden.shape[-1]
    rows = hidden.numel() // n
    hidden = hidden.contiguous()
    summed = hidden if delta is None else torch.empty_like(hidden)
    out = torch.empty_like(hidden)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    _add_rms_norm[(rows,)](hidden, hidden if delta is None else delta.contiguous(), norm.weight, summed, out, n, eps,
                           HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return summed, out


def rotary_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_table: torch.Tensor, sin_table: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The same as rotary_write_kv_torch, with cos/sin read from the [max_len, D] tables at `positions`."""
    *lead, heads, dim = q.shape
    kv_heads = k.shape[-2]
    q2, k2, v2 = q.reshape(-1, heads, dim), k.reshape(-1, kv_heads, dim), v.reshape(-1, kv_heads, dim)
    q_out = torch.empty(q2.shape, dtype=q.dtype, device=q.device)
    _rotary_write_kv[(q2.shape[0],)](
        q2, k2, v2, cos_table, sin_table, positions.reshape(-1), slots.reshape(-1), q_out, k_cache, v_cache,
        heads, kv_heads, q2.stride(0), k2.stride(0), v2.stride(0), HALF=dim // 2,
        HEADS=triton.next_power_of_2(heads), KV_HEADS=triton.next_power_of_2(kv_heads), num_warps=4)
    return q_out.view(*lead, heads, dim)
