"""Direct Preference Optimization (Rafailov et al. 2023) on chosen/rejected datum pairs, as a server-side loss.

Layout in the Tinker datum model (tinker-protocol.md §3): a pair is two datums of the same request, the chosen
and the rejected completion of one prompt, each with
  - `ref_logprobs`: the reference model's log p(target_tokens) per position (compute_logprobs on the base sampler,
    shifted by one like target_tokens: drop its leading None),
  - `dpo_pair`: the pair's marker on every token: +k on the chosen datum, −k on the rejected one (k ≥ 1, one k per
    pair; the cookbook's order "chosen, rejected, chosen, …" with k = 1, 2, … is the natural choice),
  - `weights` (optional, default 1): 1 on completion tokens, 0 on prompt tokens.
The loss sees every datum's tokens concatenated (spec.LossFn), so the marker is what groups them into pairs; both
datums of a pair must go in the same request (the SDK splits only very large batches into several).

Notation: ℓ = target_logprobs, ℓ_ref = ref_logprobs, w = weights. Per pair k and side ±,
Δ±_k = Σ_{t in pair k, side ±} w·(ℓ − ℓ_ref), reward±_k = β·Δ±_k, margin_k = reward+_k − reward−_k, and
L = Σ_k −log σ(margin_k): a SUM over pairs, like every built-in loss, so ∂L/∂ℓ_t = −σ(−margin_k)·β·w_t·(±1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from loss_plugins.spec import LossInputError, LossOutput

REF_LOGPROBS = "ref_logprobs"
PAIR = "dpo_pair"
BETA = "beta"


def _first(flags: torch.Tensor) -> int:
    return int(flags.nonzero()[0, 0])


def _pairs(marker: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pair ids k [P], each token's pair index [T], chosen flag [T]) from the signed marker."""
    bad = (marker == 0) | (marker != marker.round())
    if bad.any():
        where = _first(bad)
        raise LossInputError(f"{PAIR} must be a nonzero integer on every token (+k on pair k's chosen datum, −k on "
                             f"its rejected one), got {float(marker[where])} at position {where}")
    ids, pair_of = torch.unique(marker.abs(), return_inverse=True)
    chosen = marker > 0
    for side, flags in (("chosen (+k)", chosen), ("rejected (−k)", ~chosen)):
        present = torch.bincount(pair_of[flags], minlength=ids.numel()) > 0
        if not present.all():
            raise LossInputError(f"{PAIR} {int(ids[_first(~present)])} has no {side} tokens in this request; every "
                                 "pair needs both of its datums in the same forward_backward")
    return ids, pair_of, chosen


def _pair_beta(inputs: Mapping[str, torch.Tensor], config: Mapping[str, float | str], pair_of: torch.Tensor,
               count: int, like: torch.Tensor) -> torch.Tensor:
    """β per pair: the config value, or a per-token `beta` input, which must then be constant within each pair."""
    if BETA not in inputs:
        return torch.full((count,), float(config[BETA]), dtype=like.dtype, device=like.device)
    beta = inputs[BETA]
    low = torch.full((count,), torch.inf, dtype=beta.dtype, device=beta.device).scatter_reduce(0, pair_of, beta, "amin")
    high = torch.full_like(low, -torch.inf).scatter_reduce(0, pair_of, beta, "amax")
    if (low != high).any():
        raise LossInputError(f"a per-token {BETA} must be the same on every token of a pair; pair index "
                             f"{_first(low != high)} has values from {float(low.max())} to {float(high.max())}")
    return low


def dpo(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
        config: Mapping[str, float | str]) -> LossOutput:
    """L = Σ_pairs −log σ(β·(Δ_chosen − Δ_rejected)), Δ = Σ w·(ℓ − ref_logprobs) over the datum's tokens."""
    if target_logprobs.dim() != 1:
        raise LossInputError(f"dpo needs one target logprob per token (1-D target_tokens), got shape "
                             f"{list(target_logprobs.shape)}")
    ids, pair_of, chosen = _pairs(inputs[PAIR].detach())
    count = ids.numel()
    drift = inputs["weights"] * (target_logprobs - inputs[REF_LOGPROBS])
    zeros = torch.zeros(count, dtype=drift.dtype, device=drift.device)
    chosen_logratio = zeros.index_add(0, pair_of[chosen], drift[chosen])
    rejected_logratio = zeros.index_add(0, pair_of[~chosen], drift[~chosen])
    beta = _pair_beta(inputs, config, pair_of, count, target_logprobs)
    chosen_reward, rejected_reward = beta * chosen_logratio, beta * rejected_logratio
    margin = chosen_reward - rejected_reward
    loss = F.softplus(-margin).sum()  # −log σ(m), stable for large |m|
    with torch.no_grad():
        metrics = {
            "loss:sum": float(loss),
            "pairs:sum": float(count),
            "accuracy:mean": float((margin > 0).double().mean()),
            "margin:mean": float(margin.mean()),
            "chosen_reward:mean": float(chosen_reward.mean()),
            "rejected_reward:mean": float(rejected_reward.mean()),
        }
    return LossOutput(loss, metrics)
