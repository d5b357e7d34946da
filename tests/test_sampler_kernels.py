"""The CUDA path's pieces against the torch path: the paged decode attention kernel, the segmented LoRA kernels,
and the whole engine with kernels (and, on a GPU, CUDA graphs) vs without. On a machine without a GPU this runs
the same Triton kernels in Triton's interpreter (TRITON_INTERPRET=1, set before Triton is first imported);
without Triton installed it is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from sampler_support import train_peft_adapter

pytest.importorskip("triton")

from bus_events import payloads as p
from bus_runtime.testing import make_tiny_model
from sampler_consumer.attention import decode_attention_torch, decode_attention_triton, decode_splits
from sampler_consumer.config import SamplerConfig
from sampler_consumer.engine import Engine, GenRequest
from sampler_consumer.lora_kernels import build_tiles, max_tiles, sgmv_expand, sgmv_shrink
from sampler_consumer.models import load_base_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32 everywhere (the kernels' tl.dot too); the GPU's kernels sum in other orders than the CPU's.
ATOL = 5e-4 if DEVICE.type == "cuda" else 1e-5


@pytest.fixture(autouse=True)
def _exact_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def garbage_empty(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled memory for the test: a kernel that reads a scratch buffer where
    it never wrote (the LoRA partials, the attention parts) fails instead of passing on freshly zeroed pages."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def wrapper(*args, **kwargs):
            tensor = make(*args, **kwargs)
            return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
        return wrapper

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


@pytest.mark.parametrize("splits", [None, 1, 2, 3, 16])
def test_paged_decode_kernel_matches_torch_and_reads_only_each_rows_length(splits, garbage_empty):
    """Ragged rows (1 position, page and 64-position block boundaries, several blocks) with each row's positions
    split over 1 to 16 programs (16: most parts of most rows empty), and NaN everywhere past each row's length."""
    torch.manual_seed(0)
    pages, page, kv_heads, dim, heads = 150, 16, 2, 32, 8
    lens = torch.tensor([1, 15, 16, 17, 63, 64, 65, 130, 200, 2], device=DEVICE, dtype=torch.int32)
    width = -(-int(lens.max()) // page)
    k = torch.randn(pages, page, kv_heads, dim, device=DEVICE)
    v = torch.randn(pages, page, kv_heads, dim, device=DEVICE)
    table = (torch.randperm(pages - 1, device=DEVICE)[:len(lens) * width].view(len(lens), width) + 1).int()
    q = torch.randn(len(lens), heads, dim, device=DEVICE)
    expected = decode_attention_torch(q, k, v, table, lens, dim**-0.5)
    for row, length in enumerate(lens.tolist()):  # pages are not shared: poison each row's unfilled positions
        past = torch.arange(length, width * page, device=DEVICE)
        for cache in (k, v):
            cache[table[row, past // page].long(), past % page] = float("nan")
    got = decode_attention_triton(q, k, v, table, lens, dim**-0.5, splits=splits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_splits_fill_small_batches_only_and_never_exceed_a_rows_blocks():
    sms = 132
    assert decode_splits(rows=1024, kv_heads=8, max_positions=8192, sms=sms) == 1
    assert decode_splits(rows=4, kv_heads=8, max_positions=8192, sms=sms) > 1
    for rows in (1, 2, 8, 64):
        splits = decode_splits(rows=rows, kv_heads=8, max_positions=100, sms=sms)
        assert splits <= 2  # 100 positions are two 64-position blocks: a third part would always be empty


@pytest.mark.parametrize(("splits", "span"), [(None, None), (1, 64), (2, 128), (5, 192), (7, 256)])
def test_segmented_lora_kernels_match_per_segment_matmuls(splits, span, garbage_empty):
    """Input split over 1 to 7 programs (5 = one per 64 columns; 7: two splits past the input write zeros), output
    columns 64 to 256 per program; rows of slot 0 (between and after adapters) are left exactly as they were,
    and tiles that hold no rows (capacity padding, an empty tile first) do nothing."""
    torch.manual_seed(1)
    slots, rank, n_in, n_out, tokens = 4, 16, 300, 200, 80
    a = torch.randn(slots, rank, n_in, device=DEVICE) / 10
    b = torch.randn(slots, n_out, rank, device=DEVICE) / 10
    x = torch.randn(tokens, n_in, device=DEVICE)
    segments = [(0, 10, 1), (10, 13, 0), (13, 35, 3), (35, 40, 1), (40, 58, 0), (58, 70, 2), (70, 80, 0)]
    starts, ends, slot_of = build_tiles(segments, max_tiles(tokens, slots))
    tiles = torch.tensor([[5, *starts], [5, *ends], [2, *slot_of]], dtype=torch.int32, device=DEVICE)
    out = torch.randn(tokens, n_out, device=DEVICE)
    expected = out.clone()
    sgmv_expand(sgmv_shrink(x, a, tiles, splits=splits), b, tiles, out, span=span)
    for start, end, slot in segments:
        if slot:
            expected[start:end] += x[start:end] @ a[slot].T @ b[slot].T
        else:
            assert torch.equal(out[start:end], expected[start:end])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)


def test_kernels_compile_for_sm90_without_spills_and_with_pipelined_loops():
    """The interpreter checks the maths; this checks what a GPU would build (Triton's compiler and ptxas for sm_90,
    no GPU needed): no spilled registers, and every kernel's loop software-pipelined (asynchronous copies), which
    the decode kernel's former while loop never was."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton has no NVIDIA backend tools")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("kernel_compile_check.py"))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert len(kernels) == 6, run.stdout
    for label, facts in kernels.items():
        assert "spilled 0 " in facts, f"{label}: {facts}"
        if label != "combine 8B":  # no loop
            assert int(facts.rsplit(" ", 1)[1]) > 0, f"{label}: nothing pipelined ({facts})"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=128, num_heads=4, num_kv_heads=2)


def test_engine_with_kernels_matches_the_torch_path_and_new_adapters_need_no_new_graphs(tiny_dir):
    base = load_base_model(str(tiny_dir), DEVICE, torch.float32)
    adapters = [base.lora.parse(train_peft_adapter(tiny_dir, seed=seed, rank=rank), (f"a{seed}", "v"))
                for seed, rank in ((1, 4), (2, 8), (3, 4))]
    params = p.SamplingParams(max_tokens=12, temperature=1.0, seed=4, stop=[])
    requests = [GenRequest([5, 17, 42, 99, 7, 133], params, adapter=adapters[0], num_samples=2),
                GenRequest([250, 12, 64, 3, 201, 88, 19, 77, 140] * 3, params, adapter=adapters[1],
                           prompt_logprobs=True),
                GenRequest([9, 8, 7], params, adapter=None)]
    plain = Engine(base, SamplerConfig(kernels=False, cuda_graphs=False))
    try:
        expected = plain.generate(requests)
    finally:
        plain.close()
    fast = Engine(base, SamplerConfig(kernels=True))  # + CUDA graphs on a GPU
    try:
        got = fast.generate(requests)
        graphs = fast.core.call(lambda core: len(core.engines[base.name].executor._graphs)).result()
        swapped = [GenRequest(r.prompt, r.params, adapter=adapters[2], num_samples=r.num_samples) for r in requests]
        fast.generate(swapped)  # another adapter into a slot: same buckets, no new graph
        assert fast.core.call(lambda core: len(core.engines[base.name].executor._graphs)).result() == graphs
    finally:
        fast.close()
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want.sequences, have.sequences, strict=True):
            np.testing.assert_allclose(a.logprobs[:3], b.logprobs[:3], atol=ATOL, rtol=0)
            if DEVICE.type == "cpu":
                assert a.tokens == b.tokens
    np.testing.assert_allclose(expected[1].prompt_logprobs[1:], got[1].prompt_logprobs[1:], atol=ATOL, rtol=0)
