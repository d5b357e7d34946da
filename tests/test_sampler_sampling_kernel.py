"""The one-kernel sampling path (greedy and plain-temperature rows) against the torch path it replaces: the same
tokens and logprobs for the same seeds, rows with top-k / top-p still on the torch path (Triton's interpreter on
a machine without a GPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from sampler_consumer.sampling import sample_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("vocab", [1000, 5000])  # one block, and several blocks with a ragged last one
def test_fused_sampling_gives_the_torch_path_s_tokens_and_logprobs(vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = 12
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(DEVICE)
    logits[3, 17] = logits[3, 900] = 40.0  # a tie at the maximum: the first one wins, as in torch
    temperature = torch.tensor([1.0, 0.7, 1.3, 1.0, 1.0, 0.5, 2.0, 1.0, 1.0, 0.9, 1.0, 1.0], device=DEVICE)
    top_k = torch.tensor([0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0, 0], device=DEVICE)
    top_p = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0.8, 1, 1, 1], device=DEVICE, dtype=torch.float32)
    seeds = torch.arange(rows, device=DEVICE) * 7919 + 3
    steps = torch.arange(rows, device=DEVICE) * 5
    greedy = [3, 10, 11]  # temperature 1 passed, but not in `random`: the argmax
    truncating = torch.tensor([7, 8], device=DEVICE)
    random = torch.tensor([r for r in range(rows) if r not in greedy and r not in (7, 8)], device=DEVICE)
    args = (logits, temperature, top_k, top_p, seeds, steps, truncating, random)
    want_tokens, want_logprobs = sample_rows(*args)
    tokens, logprobs = sample_rows(*args, fused=True)
    assert tokens.tolist() == want_tokens.tolist()
    assert tokens[3].item() == 17
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-5, rtol=0)
    assert len(set(tokens[random].tolist())) > 1  # draws, not the argmax everywhere


def test_fused_sampling_reads_bf16_logits_in_their_own_dtype():
    logits = torch.randn(3, 300, device=DEVICE).to(torch.bfloat16)
    ones, zeros = torch.ones(3, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    tokens, logprobs = sample_rows(logits, ones, zeros, ones, zeros, zeros, None, None, fused=True)
    assert tokens.tolist() == logits.float().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)
