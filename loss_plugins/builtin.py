"""The built-in losses of the Tinker API (tinker-protocol.md §4), as pure functions of per-token tensors.
Their descriptions live in catalog.py, which loads this module (and torch) on the first loss computed.

Notation: ℓ = target_logprobs (learner), s = inputs["logprobs"] (sampler), A = advantages, w = weights,
r = exp(ℓ − s). Every loss is a SUM over all tokens of all datums: no mean, no normalisation, because the SDK's
forward_backward_custom sends −∂loss/∂ℓ as cross-entropy weights and relies on that exact sum.
Inputs arrive validated and in target_logprobs' dtype (registry.compute_loss); any config key may also arrive as a
per-token input of the same name, which then overrides the config value token by token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from loss_plugins.catalog import CLIP_HIGH, CLIP_LOW, SEQUENCE_RATIO_MASK
from loss_plugins.spec import DATUM_INDEX, LossInputError, LossOutput

# exp() of a larger mean NLL is inf, which JSON cannot carry; a perplexity of e^700 is as uninformative anyway.
_MAX_LOG_PERPLEXITY = 700.0


def _setting(name: str, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float | str],
             like: torch.Tensor) -> torch.Tensor:
    """A config value as a tensor: the per-token input if the request sent one, else the scalar from config."""
    if name in inputs:
        return inputs[name]
    return torch.tensor(float(config[name]), dtype=like.dtype, device=like.device)


def _fraction(flags: torch.Tensor, among: torch.Tensor) -> float:
    """Share of the tokens selected by `among` whose flag is set; 0 when none are selected."""
    count = int(among.sum())
    return float((flags & among).sum()) / count if count else 0.0


def _ratio(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.exp(target_logprobs - inputs["logprobs"])


def cross_entropy(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                  config: Mapping[str, float | str]) -> LossOutput:
    """L = −Σ w·ℓ with w arbitrary reals (negative weights carry forward_backward_custom's gradients)."""
    weights = inputs["weights"]
    loss = -(weights * target_logprobs).sum()
    with torch.no_grad():
        # mean_nll is the weighted mean NLL over tokens with POSITIVE weight only: weights ≤ 0 mark prompt tokens
        # or custom-loss surrogate gradients, for which an NLL average means nothing. No such tokens -> 0.
        counted = weights > 0
        total_weight = float(weights[counted].sum())
        mean_nll = float(-(weights * target_logprobs)[counted].sum()) / total_weight if total_weight > 0 else 0.0
    metrics = {
        "loss:sum": float(loss.detach()),
        "mean_nll:mean": mean_nll,
        "perplexity:mean": math.exp(min(mean_nll, _MAX_LOG_PERPLEXITY)),
    }
    return LossOutput(loss, metrics)


def importance_sampling(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                        config: Mapping[str, float | str]) -> LossOutput:
    """L = −Σ r·A: off-policy-corrected REINFORCE; ∂L/∂ℓ = −A·r."""
    loss = -(_ratio(target_logprobs, inputs) * inputs["advantages"]).sum()
    return LossOutput(loss, {"loss:sum": float(loss.detach())})


def ppo(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
        config: Mapping[str, float | str]) -> LossOutput:
    """L = −Σ min(r·A, clip(r, lo, hi)·A); lo/hi are the ratio bounds themselves, not ε."""
    advantages = inputs["advantages"]
    ratio = _ratio(target_logprobs, inputs)
    low = _setting(CLIP_LOW, inputs, config, ratio)
    high = _setting(CLIP_HIGH, inputs, config, ratio)
    clipped_ratio = torch.minimum(torch.maximum(ratio, low), high).detach()
    unclipped_term = ratio * advantages
    clipped_term = clipped_ratio * advantages
    # Where the clipped term is STRICTLY smaller, r lies outside [lo, hi] on the side that clip() flattens, so its
    # true gradient is zero and detaching is exact. Ties (r exactly at a bound, or A = 0) keep r·A's gradient,
    # so a ratio exactly at the bound still learns and only a ratio beyond it is cut off.
    use_clipped = clipped_term < unclipped_term
    loss = -torch.where(use_clipped, clipped_term, unclipped_term).sum()
    metrics = {"loss:sum": float(loss.detach()), "clip_fraction:mean": _fraction(use_clipped, advantages != 0)}
    return LossOutput(loss, metrics)


def cispo(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
          config: Mapping[str, float | str]) -> LossOutput:
    """L = −Σ sg[clip(r, lo, hi)]·ℓ·A: the clipped ratio only weights the REINFORCE term, it never gets gradient."""
    advantages = inputs["advantages"]
    ratio = _ratio(target_logprobs.detach(), inputs)
    low = _setting(CLIP_LOW, inputs, config, ratio)
    high = _setting(CLIP_HIGH, inputs, config, ratio)
    clipped_ratio = torch.minimum(torch.maximum(ratio, low), high)
    loss = -(clipped_ratio * target_logprobs * advantages).sum()
    outside = (ratio < low) | (ratio > high)
    metrics = {"loss:sum": float(loss.detach()), "clip_fraction:mean": _fraction(outside, advantages != 0)}
    return LossOutput(loss, metrics)


def dro(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
        config: Mapping[str, float | str]) -> LossOutput:
    """L = −Σ (ℓ·A − ½β(ℓ − s)²); ∂L/∂ℓ = −A + β(ℓ − s)."""
    beta = _setting("beta", inputs, config, target_logprobs)
    drift = target_logprobs - inputs["logprobs"]
    loss = -(target_logprobs * inputs["advantages"] - 0.5 * beta * drift * drift).sum()
    return LossOutput(loss, {"loss:sum": float(loss.detach())})


def gspo(target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
         config: Mapping[str, float | str]) -> LossOutput:
    """GSPO-token (Zheng et al. 2025), as Tinker's losses/gspo page defines it. Per datum d, over its tokens M_d with
    sequence_ratio_mask ≠ 0: log s_d = mean_{t∈M_d} sg[ℓ_t] − s_t (a datum with no such token: s_d = 1). Each
    token's ratio s_t = s_d · exp(ℓ_t − sg[ℓ_t]) has s_d's value and ℓ_t's gradient, and
    L = −Σ_t min(s_t·A_t, clip(s_t, lo, hi)·A_t)."""
    if target_logprobs.dim() != 1:
        raise LossInputError(f"gspo needs one target logprob per token (1-D target_tokens), got shape "
                             f"{list(target_logprobs.shape)}")
    advantages, datum = inputs["advantages"], inputs[DATUM_INDEX]
    in_ratio = inputs[SEQUENCE_RATIO_MASK] != 0
    count = int(datum.max()) + 1 if datum.numel() else 0
    drift = (target_logprobs.detach() - inputs["logprobs"])[in_ratio]
    totals = torch.zeros(count, dtype=drift.dtype, device=drift.device).index_add(0, datum[in_ratio], drift)
    tokens = torch.bincount(datum[in_ratio], minlength=count).to(drift.dtype)
    sequence_log_ratio = totals / tokens.clamp(min=1)  # a datum without masked tokens: 0, a ratio of 1
    ratio = torch.exp(sequence_log_ratio[datum] + target_logprobs - target_logprobs.detach())
    low = _setting(CLIP_LOW, inputs, config, ratio)
    high = _setting(CLIP_HIGH, inputs, config, ratio)
    clipped_ratio = torch.clamp(ratio, low, high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages).sum()
    with torch.no_grad():
        outside = (ratio < low) | (ratio > high)
        metrics = {"loss:sum": float(loss), "clip_fraction:mean": _fraction(outside, advantages != 0),
                   "sequence_ratio:mean": float(torch.exp(sequence_log_ratio).mean()) if count else 1.0}
    return LossOutput(loss, metrics)
