"""The fused residual-add + RMSNorm and rotary + K/V-write kernels against the torch code they replace, with a
real tiny Llama's modules and rotary tables (Triton's interpreter on a machine without a GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from bus_runtime.testing import make_tiny_model
from sampler_consumer.fused_kernels import (
    add_rms_norm_torch,
    add_rms_norm_triton,
    rotary_write_kv_torch,
    rotary_write_kv_triton,
)
from sampler_consumer.models import load_base_model
from sampler_consumer.paged_model import PagedModel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL = 5e-5 if DEVICE.type == "cuda" else 1e-5


@pytest.fixture(scope="module")
def paged(tmp_path_factory) -> PagedModel:
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    base = load_base_model(str(path), DEVICE, torch.float32)
    return PagedModel(base, 6, 4, 64, triton_attention=True)


def test_the_model_takes_the_fused_kernels_after_their_self_check(paged):
    assert paged.fused_rotary and paged.add_norm is add_rms_norm_triton


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_model_s_own_norm(paged, with_delta):
    norm = paged.layers[0].post_attention_layernorm
    torch.nn.init.normal_(norm.weight)
    hidden = torch.randn(2, 5, norm.weight.shape[0], device=DEVICE) * 3
    delta = torch.randn_like(hidden) if with_delta else None
    summed, normed = add_rms_norm_triton(hidden, delta, norm)
    want_sum, want_norm = add_rms_norm_torch(hidden, delta, norm)
    torch.testing.assert_close(summed, want_sum, atol=ATOL, rtol=0)
    torch.testing.assert_close(normed, want_norm, atol=ATOL, rtol=1e-5)


def test_rotary_write_kv_matches_torch_and_writes_only_the_given_slots(paged):
    tokens = 7
    q = torch.randn(tokens, paged.heads, paged.head_dim, device=DEVICE)
    k = torch.randn(tokens, paged.kv_heads, paged.head_dim, device=DEVICE)
    v = torch.randn_like(k)
    positions = torch.tensor([0, 1, 2, 9, 33, 63, 5], device=DEVICE)
    slots = torch.tensor([4, 5, 6, 7, 12, 13, 22], device=DEVICE)  # pages 1, 1, 1, 1, 3, 3, 5 (page size 4)
    shape = (6, 4, paged.kv_heads, paged.head_dim)
    k_got, v_got, k_want, v_want = (torch.full(shape, 7.0, device=DEVICE) for _ in range(4))
    got = rotary_write_kv_triton(q, k, v, positions, paged.cos, paged.sin, k_got, v_got, slots)
    want = rotary_write_kv_torch(q, k, v, paged.cos[positions], paged.sin[positions], k_want, v_want, slots)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_got, k_want, atol=ATOL, rtol=0)
    torch.testing.assert_close(v_got, v_want, atol=0, rtol=0)
    untouched = torch.ones(6 * 4, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert (k_got.view(24, -1)[untouched] == 7.0).all() and (v_got.view(24, -1)[untouched] == 7.0).all()


def test_the_forward_with_fused_kernels_equals_the_torch_forward(paged, tmp_path):
    from sampler_consumer.paged_model import DecodeMeta

    tokens = torch.tensor([3, 17, 42], device=DEVICE)
    positions = torch.tensor([0, 0, 0], device=DEVICE)
    slots = torch.tensor([4, 8, 12], device=DEVICE)
    meta = DecodeMeta(torch.tensor([[1], [2], [3]], device=DEVICE, dtype=torch.int32),
                      torch.ones(3, device=DEVICE, dtype=torch.int32))
    fused = paged.forward(tokens, positions, slots, meta)
    paged.add_norm, paged.fused_rotary = add_rms_norm_torch, False
    try:
        plain = paged.forward(tokens, positions, slots, meta)
    finally:
        paged.add_norm, paged.fused_rotary = add_rms_norm_triton, True
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
