"""The dpo loss against an independent float64 reference (loops over pairs and tokens with math.log/exp, the
gradient from the analytic formula in loss_plugins/dpo.py), its datum layout, metrics and rejections."""

from __future__ import annotations

import math

import pytest
import torch

from loss_plugins import LossInputError, compute_loss, get_loss

F64 = torch.float64


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_dpo(lp: list[float], ref: list[float], pair: list[float], weights: list[float],
            beta: float) -> tuple[float, list[float], dict[int, float]]:
    """Loss, ∂L/∂ℓ per token and each pair's margin, from plain loops."""
    logratio: dict[int, list[float]] = {}
    for l_t, r_t, k_t, w_t in zip(lp, ref, pair, weights, strict=True):
        sides = logratio.setdefault(abs(int(k_t)), [0.0, 0.0])
        sides[0 if k_t > 0 else 1] += w_t * (l_t - r_t)
    margins = {k: beta * (c - r) for k, (c, r) in logratio.items()}
    loss = sum(-math.log(_sigmoid(m)) for m in margins.values())
    grad = [-(1.0 - _sigmoid(margins[abs(int(k_t))])) * beta * w_t * (1.0 if k_t > 0 else -1.0)
            for k_t, w_t in zip(pair, weights, strict=True)]
    return loss, grad, margins


def random_pairs(pairs: int, seed: int, *, shuffled: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`pairs` chosen/rejected datums of 1-9 tokens each, prompt tokens weighted 0, in cookbook order unless
    `shuffled` (the marker, not the order, defines the pairs)."""
    g = torch.Generator().manual_seed(seed)
    datums = []
    for k in range(1, pairs + 1):
        for sign in (1.0, -1.0):
            n = int(torch.randint(1, 10, (1,), generator=g))
            weights = (torch.arange(n) >= n // 3).to(F64)
            datums.append((torch.full((n,), sign * k, dtype=F64), weights))
    if shuffled:
        datums = [datums[i] for i in torch.randperm(len(datums), generator=g).tolist()]
    marker = torch.cat([d[0] for d in datums])
    weights = torch.cat([d[1] for d in datums])
    target = -4 * torch.rand(marker.shape, generator=g, dtype=F64) - 1e-3
    ref = target + 0.5 * torch.randn(marker.shape, generator=g, dtype=F64)
    return target, {"ref_logprobs": ref, "dpo_pair": marker, "weights": weights}


def run(target: torch.Tensor, inputs, config=None):
    leaf = target.detach().clone().requires_grad_(True)
    output = compute_loss("dpo", leaf, inputs, config)
    output.loss.backward()
    return output, leaf.grad


@pytest.mark.parametrize("pairs", [1, 3, 40])
@pytest.mark.parametrize("beta", [None, 0.5])
@pytest.mark.parametrize("shuffled", [False, True])
def test_value_gradient_and_metrics_match_reference(pairs, beta, shuffled):
    target, inputs = random_pairs(pairs, seed=pairs, shuffled=shuffled)
    config = {} if beta is None else {"beta": beta}
    output, grad = run(target, inputs, config)
    loss, expected_grad, margins = ref_dpo(target.tolist(), inputs["ref_logprobs"].tolist(),
                                           inputs["dpo_pair"].tolist(), inputs["weights"].tolist(),
                                           0.1 if beta is None else beta)
    assert output.loss.item() == pytest.approx(loss, rel=1e-12)
    assert output.metrics["loss:sum"] == pytest.approx(loss, rel=1e-12)
    assert grad.tolist() == pytest.approx(expected_grad, rel=1e-12, abs=1e-15)
    values = list(margins.values())
    assert output.metrics["pairs:sum"] == pairs
    assert output.metrics["margin:mean"] == pytest.approx(sum(values) / pairs, rel=1e-12, abs=1e-15)
    assert output.metrics["accuracy:mean"] == sum(m > 0 for m in values) / pairs
    assert (output.metrics["chosen_reward:mean"] - output.metrics["rejected_reward:mean"]
            == pytest.approx(output.metrics["margin:mean"], abs=1e-12))


def test_at_the_reference_the_loss_is_log_two_per_pair_and_accuracy_zero():
    target, inputs = random_pairs(5, seed=1)
    inputs["ref_logprobs"] = target.clone()
    output, grad = run(target, inputs)
    assert output.metrics["loss:sum"] == pytest.approx(5 * math.log(2), rel=1e-14)
    assert output.metrics["accuracy:mean"] == 0.0 and output.metrics["margin:mean"] == 0.0
    # Gradient ½β·w, pushing chosen tokens up and rejected tokens down.
    expected = -0.5 * 0.1 * inputs["weights"] * inputs["dpo_pair"].sign()
    assert torch.allclose(grad, expected, rtol=0, atol=1e-15)


def test_prompt_tokens_with_zero_weight_get_no_gradient_and_missing_weights_mean_ones():
    target, inputs = random_pairs(4, seed=2)
    _, grad = run(target, inputs)
    assert (grad[inputs["weights"] == 0] == 0).all() and (grad[inputs["weights"] > 0] != 0).all()
    no_weights = {k: v for k, v in inputs.items() if k != "weights"}
    loss, _, _ = ref_dpo(target.tolist(), inputs["ref_logprobs"].tolist(), inputs["dpo_pair"].tolist(),
                         [1.0] * target.numel(), 0.1)
    assert run(target, no_weights)[0].metrics["loss:sum"] == pytest.approx(loss, rel=1e-12)


def test_huge_margins_stay_finite():
    target = torch.tensor([-0.1, -90.0], dtype=F64)
    inputs = {"ref_logprobs": torch.tensor([-90.0, -0.1], dtype=F64), "dpo_pair": torch.tensor([1.0, -1.0], dtype=F64)}
    wrong_way = {**inputs, "dpo_pair": -inputs["dpo_pair"]}
    assert run(target, inputs, {"beta": 10.0})[0].metrics["loss:sum"] == pytest.approx(0.0, abs=1e-300)
    output, grad = run(target, wrong_way, {"beta": 10.0})
    assert output.metrics["loss:sum"] == pytest.approx(10.0 * 2 * 89.9, rel=1e-12)
    assert torch.isfinite(grad).all()


def test_per_token_beta_must_be_constant_within_a_pair():
    target, inputs = random_pairs(2, seed=3)
    beta = torch.where(inputs["dpo_pair"].abs() == 1, torch.tensor(0.2, dtype=F64), torch.tensor(0.7, dtype=F64))
    output, _ = run(target, {**inputs, "beta": beta})
    loss = sum(ref_dpo(*[t[inputs["dpo_pair"].abs() == k].tolist() for t in
                         (target, inputs["ref_logprobs"], inputs["dpo_pair"], inputs["weights"])], b)[0]
               for k, b in ((1, 0.2), (2, 0.7)))
    assert output.metrics["loss:sum"] == pytest.approx(loss, rel=1e-12)
    beta[0] = 0.3
    with pytest.raises(LossInputError, match="per-token beta must be the same on every token of a pair"):
        compute_loss("dpo", target, {**inputs, "beta": beta}, None)


@pytest.mark.parametrize(("marker", "message"), [
    ([1.0, 1.0, 0.0], r"dpo_pair must be a nonzero integer on every token .* got 0.0 at position 2"),
    ([1.0, -1.5, -1.5], r"got -1.5 at position 1"),
    ([1.0, -1.0, 2.0], r"dpo_pair 2 has no rejected \(−k\) tokens in this request"),
    ([-3.0, -3.0, -3.0], r"dpo_pair 3 has no chosen \(\+k\) tokens"),
])
def test_bad_markers_are_rejected_naming_the_field(marker, message):
    target = -torch.rand(3, dtype=F64)
    with pytest.raises(LossInputError, match=message):
        compute_loss("dpo", target, {"ref_logprobs": target, "dpo_pair": torch.tensor(marker, dtype=F64)}, None)


def test_required_inputs_two_dimensional_targets_and_config_are_checked():
    target = -torch.rand(4, dtype=F64)
    with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\['ref_logprobs'\]"):
        compute_loss("dpo", target, {"dpo_pair": torch.tensor([1.0, 1, -1, -1])}, None)
    with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\['dpo_pair'\]"):
        compute_loss("dpo", target, {"ref_logprobs": target}, None)
    with pytest.raises(LossInputError, match="dpo needs one target logprob per token"):
        compute_loss("dpo", -torch.rand(2, 2), {"ref_logprobs": -torch.rand(2, 2), "dpo_pair": torch.ones(2, 2)}, None)
    with pytest.raises(LossInputError, match="unknown loss_fn_config key 'clip_low_threshold' for loss_fn 'dpo'"):
        compute_loss("dpo", target, {}, {"clip_low_threshold": 0.5})


def test_float32_is_computed_in_float32_and_spec_describes_the_layout():
    target, inputs = random_pairs(3, seed=4)
    output = compute_loss("dpo", target.float(), inputs, None)
    assert output.loss.dtype == torch.float32
    spec = get_loss("dpo")
    assert set(spec.accepted_inputs) == {"ref_logprobs", "dpo_pair", "weights", "beta"}
    assert dict(spec.config_defaults) == {"beta": 0.1} and "dpo_pair" in spec.description
