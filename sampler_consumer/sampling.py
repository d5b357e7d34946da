"""Choosing every row's next token on the device, each with its own temperature / top-k / top-p and seed.

Determinism: row r's k-th token uses the uniform number hash(seed_r, k), computed on the device from integers
(no generator state), and picks the token by inverse CDF; so a row's tokens depend only on its seed and its own
logits, never on what it is batched with or when it joined. Rows that truncate (top-k / top-p) sample in
probability-sorted order (stable sort), the others in vocabulary order; which path a row takes depends only on
its own parameters.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

SEED_SPACE = 2**63 - 1  # the real service folds any 64-bit seed into [0, 2**63-1)
ALT_TOKENS_SAMPLE = -1  # the sample index whose seed draws prompt_alt_tokens (samples are 0, 1, ...)
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it stays inside int64, on every device


def sample_seed(seed: int | None, sample_index: int) -> int:
    """The seed of sample `sample_index` of a request: distinct per sample, fixed per (seed, index)."""
    if seed is None:
        return secrets.randbits(62)
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_SPACE


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two xorshift-multiply rounds) in int64 arithmetic that never overflows."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def hashed_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """float64 in [0, 1) from (seed [R] int64 >= 0, step [R] int64): 48 bits from two chained hashes."""
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    h1 = _mix32(_mix32(_mix32(low ^ 0x2545F491) ^ high) ^ (steps & _MASK32))
    h2 = _mix32(h1 ^ 0x68E31DA4)
    return ((h1 >> 8).double() * 2.0**24 + (h2 >> 8).double()) * 2.0**-48


def _inverse_cdf_many(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[R, n] indices for uniforms [R, n]: i with cdf[i-1] <= u*total < cdf[i]; `right=True` never picks a
    zero-probability token."""
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return _inverse_cdf_many(probs, uniforms.unsqueeze(1)).squeeze(1)


def _truncated(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               uniforms: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device)
    keep = ranks.unsqueeze(0) < torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    probs = torch.softmax(sorted_logits, dim=-1)
    keep &= (probs.cumsum(-1) - probs) < top_p.unsqueeze(1)  # the most likely token is always kept
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    return order.gather(1, _inverse_cdf(probs, uniforms).unsqueeze(1)).squeeze(1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, steps: torch.Tensor, truncating: torch.Tensor | None,
                random: torch.Tensor | None, *, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [R], logprobs [R]) for logits [R, V]; `random` / `truncating` index the rows with temperature > 0
    without / with top-k or top-p (the caller knows them from the rows' parameters; other rows are greedy).
    `fused`: the greedy and `random` rows in one Triton kernel (sampling_kernels.py, CUDA).

    The returned logprob is log p(token) under the model itself (temperature 1, no truncation), the number
    the trainer's forward pass computes for the same token; vLLM's default "raw logprobs" alike.
    """
    uniforms = hashed_uniform(seeds, steps)
    passes: tuple[tuple[torch.Tensor | None, bool], ...]
    if fused:
        from sampler_consumer.sampling_kernels import sample_plain_rows

        plain_temperature = torch.zeros_like(temperature)  # 0: greedy, in the kernel
        if random is not None and random.numel():
            plain_temperature.index_copy_(0, random, temperature.index_select(0, random))
        tokens, log_total = sample_plain_rows(logits, plain_temperature, uniforms)
        passes = ((truncating, True),)
    else:
        logits = logits.float()
        log_total = torch.logsumexp(logits, dim=-1)  # log p(t) = logit(t) - this: no [R, V] log_softmax
        tokens = logits.argmax(dim=-1)
        passes = ((random, False), (truncating, True))
    for index, truncates in passes:
        if index is None or index.numel() == 0:
            continue
        scaled = logits.index_select(0, index).float() / temperature.index_select(0, index).unsqueeze(1)
        if truncates:
            chosen = _truncated(scaled, top_k.index_select(0, index), top_p.index_select(0, index),
                                uniforms.index_select(0, index))
        else:
            chosen = _inverse_cdf(torch.softmax(scaled, dim=-1), uniforms.index_select(0, index))
        tokens.index_copy_(0, index, chosen)
    return tokens, logits.gather(1, tokens.unsqueeze(1)).squeeze(1).float() - log_total


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, k], logprobs [R, k]) of each row's k most likely tokens, descending. A logprob is computed as
    `sample_rows` computes the sampled token's (logit - logsumexp), so the two agree exactly on a shared token."""
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)
    return ids, values - torch.logsumexp(logits, dim=-1, keepdim=True)


def draw_alternatives(logprobs: torch.Tensor, k: int, temperature: float, seed: int,
                      first_row: int) -> torch.Tensor:
    """[C, k] token ids drawn with replacement from each row of log-probabilities [C, V] at `temperature`
    (0: the argmax k times). Draw j of row r (the request's row first_row + r) uses hashed_uniform(seed,
    row * k + j), so draws depend on the seed and the row only, not on how the rows are chunked."""
    if temperature == 0:
        return logprobs.argmax(dim=-1, keepdim=True).expand(-1, k)
    rows = torch.arange(first_row, first_row + logprobs.shape[0], device=logprobs.device)
    steps = rows.unsqueeze(1) * k + torch.arange(k, device=logprobs.device)
    uniforms = hashed_uniform(torch.full_like(steps, seed), steps)
    return _inverse_cdf_many(torch.softmax(logprobs / temperature, dim=-1), uniforms)
