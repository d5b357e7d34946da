"""Choosing the next token of every row with that row's own temperature / top-k / top-p and generator.

Determinism: each row draws one uniform number per step from its own CPU torch.Generator and picks the token
by inverse CDF, so a row's tokens depend only on its seed and its own logits, never on what it is batched
with. Rows that truncate (top-k / top-p) sample in probability-sorted order (stable sort), the others in
vocabulary order; which path a row takes depends only on its own parameters.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

from bus_events import payloads as p

SEED_SPACE = 2**63 - 1  # the real service folds any 64-bit seed into [0, 2**63-1)


def sample_seed(seed: int | None, sample_index: int) -> int:
    """The generator seed of sample `sample_index` of a request: distinct per sample, fixed per (seed, index)."""
    if seed is None:
        return secrets.randbits(62)
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_SPACE


@dataclass
class RowSampling:
    """The sampling state of one row: its parameters and its generator."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator

    @classmethod
    def create(cls, params: p.SamplingParams, sample_index: int) -> RowSampling:
        generator = torch.Generator()
        generator.manual_seed(sample_seed(params.seed, sample_index))
        return cls(params.temperature, params.top_k, params.top_p, generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u*total < cdf[i]; `right=True` never picks a zero-probability token."""
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _truncated_sample(scaled: torch.Tensor, rows: list[RowSampling], uniforms: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    vocab = scaled.shape[-1]
    ranks = torch.arange(vocab, device=scaled.device)
    top_k = torch.tensor([r.top_k if r.top_k > 0 else vocab for r in rows], device=scaled.device)
    keep = ranks.unsqueeze(0) < top_k.unsqueeze(1)
    top_p = torch.tensor([r.top_p for r in rows], device=scaled.device, dtype=scaled.dtype)
    probs = torch.softmax(sorted_logits, dim=-1)
    keep &= (probs.cumsum(-1) - probs) < top_p.unsqueeze(1)  # the most likely token is always kept
    probs = torch.softmax(sorted_logits.masked_fill(~keep, float("-inf")), dim=-1)
    return order.gather(1, _inverse_cdf(probs, uniforms).unsqueeze(1)).squeeze(1)


def sample_next(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [R], logprobs [R]) for logits [R, V].

    The returned logprob is log p(token) under the model itself (temperature 1, no truncation), the number
    that the trainer's forward pass computes for the same token; vLLM's default "raw logprobs" alike.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, row in enumerate(rows):
        if not row.greedy:
            groups[row.truncates].append(i)
    for truncates, index in groups.items():
        if not index:
            continue
        sel = torch.tensor(index, device=logits.device)
        uniforms = torch.stack([torch.rand((), generator=rows[i].generator) for i in index])
        temps = torch.tensor([rows[i].temperature for i in index], device=logits.device).unsqueeze(1)
        scaled = logits.index_select(0, sel) / temps
        if truncates:
            chosen = _truncated_sample(scaled, [rows[i] for i in index], uniforms)
        else:
            chosen = _inverse_cdf(torch.softmax(scaled, dim=-1), uniforms)
        tokens[sel] = chosen
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
