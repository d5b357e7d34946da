"""gspo (Tinker's losses/gspo page: GSPO-token) against values computed by hand, datum by datum."""

from __future__ import annotations

import math

import pytest
import torch

from loss_plugins import LossInputError, UnknownLoss, compute_loss, get_loss

F64 = torch.float64
LOOSE = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}


def _run(lp, inputs, config=None, lengths=None):
    target = torch.tensor(lp, dtype=F64, requires_grad=True)
    out = compute_loss("gspo", target, {k: torch.tensor(v, dtype=F64) for k, v in inputs.items()}, config, lengths)
    out.loss.backward()
    return out, target.grad


def test_each_datum_carries_its_own_sequence_ratio_with_each_tokens_gradient():
    # datum 0: drifts 0.5 and 0.5 -> s = e^0.5; datum 1: drift 0 -> s = 1. All inside [0.5, 2].
    out, grad = _run([-1.0, -2.0, -1.0], {"logprobs": [-1.5, -2.5, -1.0], "advantages": [1.0, 3.0, -2.0]},
                     LOOSE, [2, 1])
    s0 = math.exp(0.5)
    assert out.loss.item() == pytest.approx(-(s0 * 1.0 + s0 * 3.0 + 1.0 * -2.0), rel=1e-12)
    # ∂L/∂ℓ_t = −A_t·s_t: the value is the datum's, the gradient is the token's own.
    assert grad.tolist() == pytest.approx([-s0 * 1.0, -s0 * 3.0, 2.0], rel=1e-12)
    assert out.metrics["clip_fraction:mean"] == 0.0
    assert out.metrics["sequence_ratio:mean"] == pytest.approx((s0 + 1.0) / 2, rel=1e-12)


def test_sequence_ratio_mask_picks_the_tokens_of_the_ratio():
    # Only token 1 is in the ratio: log s = 0.2 for both tokens of the datum.
    out, grad = _run([-1.0, -1.0], {"logprobs": [-3.0, -1.2], "advantages": [1.0, 1.0],
                                    "sequence_ratio_mask": [0.0, 1.0]}, LOOSE)
    s = math.exp(0.2)
    assert out.loss.item() == pytest.approx(-2 * s, rel=1e-12)
    assert grad.tolist() == pytest.approx([-s, -s], rel=1e-12)


def test_a_datum_without_masked_tokens_has_ratio_one():
    out, grad = _run([-1.0, -4.0], {"logprobs": [-2.0, -1.0], "advantages": [2.0, 2.0],
                                    "sequence_ratio_mask": [0.0, 0.0]}, LOOSE)
    assert out.loss.item() == pytest.approx(-4.0, rel=1e-12)
    assert grad.tolist() == pytest.approx([-2.0, -2.0], rel=1e-12)


def test_default_bounds_are_the_papers_and_clip_whole_sequences():
    assert dict(get_loss("gspo").config_defaults) == pytest.approx(
        {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4})
    # s = e^0.5 > 1.0004 with A > 0: the clipped term is smaller, constant, so no gradient on either token.
    out, grad = _run([-1.0, -2.0], {"logprobs": [-1.5, -2.5], "advantages": [1.0, 1.0]})
    assert out.loss.item() == pytest.approx(-2 * (1 + 4e-4), rel=1e-12)
    assert grad.tolist() == [0.0, 0.0]
    assert out.metrics["clip_fraction:mean"] == 1.0
    # With A < 0 the unclipped term is the smaller one: it keeps its gradient −A·s.
    out, grad = _run([-1.0, -2.0], {"logprobs": [-1.5, -2.5], "advantages": [-1.0, -1.0]})
    assert out.loss.item() == pytest.approx(2 * math.exp(0.5), rel=1e-12)
    assert grad.tolist() == pytest.approx([math.exp(0.5)] * 2, rel=1e-12)


def test_gspo_names_what_it_rejects():
    with pytest.raises(LossInputError, match="1-D target_tokens"):
        compute_loss("gspo", torch.zeros(3, 2, dtype=F64), {"logprobs": torch.zeros(3, 2, dtype=F64),
                                                             "advantages": torch.zeros(3, 2, dtype=F64)}, None)
    with pytest.raises(LossInputError, match="advantages"):
        compute_loss("gspo", torch.zeros(3, dtype=F64), {"logprobs": torch.zeros(3, dtype=F64)}, None)
    with pytest.raises(LossInputError, match="do not add up"):
        compute_loss("gspo", torch.zeros(3, dtype=F64), {"logprobs": torch.zeros(3, dtype=F64),
                                                         "advantages": torch.zeros(3, dtype=F64)}, None, [1, 1])


def test_stable_reinforce_is_refused_with_the_reason():
    with pytest.raises(UnknownLoss, match=r"stable_reinforce.*not served.*record_stability_info"):
        get_loss("stable_reinforce")
