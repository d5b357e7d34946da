"""loss_plugins: every built-in loss against an independent float64 reference (plain Python loops over tokens with
math.exp, gradients from the analytic formulas of tinker-protocol.md §4), plus validation, registry and plugins."""

from __future__ import annotations

import logging
import math
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

from loss_plugins import (
    ENTRY_POINT_GROUP,
    LossInputError,
    LossOutput,
    LossSpec,
    UnknownLoss,
    compute_loss,
    get_loss,
    list_losses,
    register_loss,
)
from loss_plugins import registry as loss_registry

F64 = torch.float64
LO, HI = "clip_low_threshold", "clip_high_threshold"
BUILTINS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
POLICY_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
CLIPPED_LOSSES = ("ppo", "cispo")
SIZES = (1, 7, 64, 257)
# The protocol's defaults, written out here rather than read from the registry, so the test checks them too.
PROTOCOL_DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {}, "importance_sampling": {}, "ppo": {LO: 0.8, HI: 1.2}, "cispo": {LO: 0.0, HI: 4.0},
    "dro": {"beta": 0.05},
}
CUSTOM_CONFIGS: dict[str, dict[str, float]] = {
    "cross_entropy": {}, "importance_sampling": {}, "ppo": {LO: 0.7, HI: 1.25}, "cispo": {LO: 0.9, HI: 1.1},
    "dro": {"beta": 0.3},
}


# ---------------------------------------------------------------- independent references: loops over tokens

Reference = Callable[[list[float], dict[str, list[float]], dict[str, float]], tuple[float, list[float]]]


def _bound(name: str, t: int, inputs: dict[str, list[float]], config: dict[str, float]) -> float:
    return inputs[name][t] if name in inputs else config[name]


def ref_cross_entropy(lp, inputs, config):
    loss, grad = 0.0, []
    for t, l_t in enumerate(lp):
        w_t = inputs["weights"][t] if "weights" in inputs else 1.0
        loss -= w_t * l_t
        grad.append(-w_t)
    return loss, grad


def ref_importance_sampling(lp, inputs, config):
    loss, grad = 0.0, []
    for l_t, s_t, a_t in zip(lp, inputs["logprobs"], inputs["advantages"], strict=True):
        r_t = math.exp(l_t - s_t)
        loss -= r_t * a_t
        grad.append(-a_t * r_t)
    return loss, grad


def ref_ppo(lp, inputs, config):
    loss, grad = 0.0, []
    for t, (l_t, s_t, a_t) in enumerate(zip(lp, inputs["logprobs"], inputs["advantages"], strict=True)):
        lo, hi = _bound(LO, t, inputs, config), _bound(HI, t, inputs, config)
        r_t = math.exp(l_t - s_t)
        loss -= min(r_t * a_t, min(max(r_t, lo), hi) * a_t)
        # The pessimistic bound cuts the gradient only when the ratio has moved BEYOND the bound in the direction
        # the advantage pushes it: up past hi for A > 0, down past lo for A < 0.
        cut = (a_t > 0 and r_t > hi) or (a_t < 0 and r_t < lo)
        grad.append(0.0 if cut else -a_t * r_t)
    return loss, grad


def ref_cispo(lp, inputs, config):
    loss, grad = 0.0, []
    for t, (l_t, s_t, a_t) in enumerate(zip(lp, inputs["logprobs"], inputs["advantages"], strict=True)):
        lo, hi = _bound(LO, t, inputs, config), _bound(HI, t, inputs, config)
        weight = min(max(math.exp(l_t - s_t), lo), hi)
        loss -= weight * l_t * a_t
        grad.append(-weight * a_t)
    return loss, grad


def ref_dro(lp, inputs, config):
    loss, grad = 0.0, []
    for t, (l_t, s_t, a_t) in enumerate(zip(lp, inputs["logprobs"], inputs["advantages"], strict=True)):
        beta = inputs["beta"][t] if "beta" in inputs else config["beta"]
        loss -= l_t * a_t - 0.5 * beta * (l_t - s_t) ** 2
        grad.append(-a_t + beta * (l_t - s_t))
    return loss, grad


REFERENCES: dict[str, Reference] = {
    "cross_entropy": ref_cross_entropy, "importance_sampling": ref_importance_sampling, "ppo": ref_ppo,
    "cispo": ref_cispo, "dro": ref_dro,
}


# ---------------------------------------------------------------- helpers

def random_case(name: str, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Learner logprobs in (-4, 0); sampler logprobs within ~0.4 nats, so ratios straddle every clip bound."""
    g = torch.Generator().manual_seed(seed)
    target = -4 * torch.rand(shape, generator=g, dtype=F64) - 1e-3
    if name == "cross_entropy":
        return target, {"weights": torch.randn(shape, generator=g, dtype=F64)}  # negative weights included
    sampler = target + 0.4 * torch.randn(shape, generator=g, dtype=F64)
    return target, {"logprobs": sampler, "advantages": torch.randn(shape, generator=g, dtype=F64)}


def run_with_grad(name: str, target: torch.Tensor, inputs, config=None) -> tuple[LossOutput, torch.Tensor]:
    leaf = target.detach().clone().requires_grad_(True)
    output = compute_loss(name, leaf, inputs, config)
    output.loss.backward()
    return output, leaf.grad


def reference(name: str, target: torch.Tensor, inputs, config=None) -> tuple[float, list[float]]:
    flat = {key: value.flatten().tolist() for key, value in inputs.items()}
    return REFERENCES[name](target.flatten().tolist(), flat, {**PROTOCOL_DEFAULTS[name], **(config or {})})


def assert_matches_reference(name: str, target: torch.Tensor, inputs, config=None, rel: float = 1e-12) -> LossOutput:
    output, grad = run_with_grad(name, target, inputs, config)
    expected_loss, expected_grad = reference(name, target, inputs, config)
    assert output.loss.item() == pytest.approx(expected_loss, rel=rel, abs=rel)
    assert output.metrics["loss:sum"] == pytest.approx(expected_loss, rel=rel, abs=rel)
    assert grad.flatten().tolist() == pytest.approx(expected_grad, rel=rel, abs=rel)
    return output


@pytest.fixture
def scratch_registry(monkeypatch):
    """A private copy of the registry, so registrations in one test never leak into another."""
    monkeypatch.setattr(loss_registry, "_losses", dict(loss_registry._losses))
    monkeypatch.setattr(loss_registry, "_entry_points_loaded", False)


# ---------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("config_kind", ["defaults", "custom"])
@pytest.mark.parametrize("name", BUILTINS)
def test_value_and_gradient_match_reference(name, config_kind, size):
    target, inputs = random_case(name, (size,), seed=size)
    config = CUSTOM_CONFIGS[name] if config_kind == "custom" else None
    output = assert_matches_reference(name, target, inputs, config)
    assert output.loss.dtype == F64 and output.loss.dim() == 0


@pytest.mark.parametrize("name", CLIPPED_LOSSES)
def test_per_token_clip_thresholds_override_config(name):
    target, inputs = random_case(name, (100,), seed=3)
    g = torch.Generator().manual_seed(4)
    inputs[LO] = 0.5 + 0.5 * torch.rand(100, generator=g, dtype=F64)
    inputs[HI] = 1.0 + 0.5 * torch.rand(100, generator=g, dtype=F64)
    # The config (ignored where a per-token value exists) would clip everything if it were used.
    assert_matches_reference(name, target, inputs, {LO: 1.0, HI: 1.0})
    only_high = {k: v for k, v in inputs.items() if k != LO}  # per-token hi, config lo
    assert_matches_reference(name, target, only_high, {LO: 0.6})


def test_dro_accepts_per_token_beta():
    target, inputs = random_case("dro", (30,), seed=5)
    inputs["beta"] = torch.linspace(0.0, 1.0, 30, dtype=F64)
    assert_matches_reference("dro", target, inputs)


@pytest.mark.parametrize("name", BUILTINS)
def test_float32_is_computed_in_float32(name):
    target, inputs = random_case(name, (64,), seed=9)
    output, grad = run_with_grad(name, target.float(), inputs)  # float64 inputs are cast down, never the reverse
    assert output.loss.dtype == torch.float32 and grad.dtype == torch.float32
    expected_loss, expected_grad = reference(name, target.float().double(), inputs)
    assert output.loss.item() == pytest.approx(expected_loss, rel=1e-4, abs=1e-4)
    assert grad.tolist() == pytest.approx(expected_grad, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
def test_sum_reduction_two_halves_equal_one_call(name):
    target, inputs = random_case(name, (90,), seed=11)
    whole, whole_grad = run_with_grad(name, target, inputs)
    first, first_grad = run_with_grad(name, target[:40], {k: v[:40] for k, v in inputs.items()})
    second, second_grad = run_with_grad(name, target[40:], {k: v[40:] for k, v in inputs.items()})
    assert whole.loss.item() == pytest.approx(first.loss.item() + second.loss.item(), rel=1e-12)
    assert whole.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"] + second.metrics["loss:sum"])
    assert torch.allclose(whole_grad, torch.cat([first_grad, second_grad]), rtol=1e-12, atol=0)
    # and the sum really is a sum: doubling every token doubles the loss
    doubled, _ = run_with_grad(name, torch.cat([target, target]), {k: torch.cat([v, v]) for k, v in inputs.items()})
    assert doubled.loss.item() == pytest.approx(2 * whole.loss.item(), rel=1e-12)


@pytest.mark.parametrize("name", BUILTINS)
def test_metric_keys_have_exactly_one_colon_and_loss_sum(name):
    target, inputs = random_case(name, (20,), seed=2)
    metrics = compute_loss(name, target, inputs, None).metrics
    assert "loss:sum" in metrics
    assert all(key.count(":") == 1 and isinstance(value, float) for key, value in metrics.items())


# ---------------------------------------------------------------- cross_entropy specifics

def test_cross_entropy_missing_weights_means_ones():
    target, _ = random_case("cross_entropy", (33,), seed=1)
    implicit, implicit_grad = run_with_grad("cross_entropy", target, {})
    explicit, explicit_grad = run_with_grad("cross_entropy", target, {"weights": torch.ones(33, dtype=F64)})
    assert implicit.loss.item() == pytest.approx(-sum(target.tolist()), rel=1e-12)
    assert implicit.loss.item() == explicit.loss.item()
    assert torch.equal(implicit_grad, explicit_grad) and torch.equal(implicit_grad, -torch.ones(33, dtype=F64))


def test_cross_entropy_zero_weights_give_zero_loss_and_gradient():
    target, _ = random_case("cross_entropy", (12,), seed=1)
    output, grad = run_with_grad("cross_entropy", target, {"weights": torch.zeros(12, dtype=F64)})
    assert output.loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert output.metrics["mean_nll:mean"] == 0.0 and output.metrics["perplexity:mean"] == 1.0


def test_cross_entropy_negative_weights_reproduce_any_custom_gradient():
    """forward_backward_custom sends weights = −∂f/∂ℓ; the server's CE gradient must then equal ∂f/∂ℓ exactly."""
    target, _ = random_case("cross_entropy", (50,), seed=6)
    probe = target.clone().requires_grad_(True)
    (probe.sin() * probe.cos().exp()).sum().backward()  # an arbitrary custom loss f(ℓ) with mixed-sign gradient
    custom_grad = probe.grad
    assert (custom_grad > 0).any() and (custom_grad < 0).any()
    output, grad = run_with_grad("cross_entropy", target, {"weights": -custom_grad})
    assert torch.allclose(grad, custom_grad, rtol=0, atol=0)
    expected = sum(g * lp for g, lp in zip(custom_grad.tolist(), target.tolist(), strict=True))
    assert output.loss.item() == pytest.approx(expected, rel=1e-12)


def test_cross_entropy_mean_nll_and_perplexity_count_positive_weights_only():
    target = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], dtype=F64)
    weights = torch.tensor([1.0, 3.0, 0.0, -2.0, 0.5], dtype=F64)
    metrics = compute_loss("cross_entropy", target, {"weights": weights}, None).metrics
    expected = (1.0 * 1 + 3.0 * 2 + 0.5 * 5) / (1.0 + 3.0 + 0.5)
    assert metrics["mean_nll:mean"] == pytest.approx(expected, rel=1e-12)
    assert metrics["perplexity:mean"] == pytest.approx(math.exp(expected), rel=1e-12)
    assert metrics["loss:sum"] == pytest.approx(1 + 6 + 0 - 8 + 2.5)


def test_cross_entropy_two_dimensional_targets():
    target, inputs = random_case("cross_entropy", (9, 4), seed=8)
    output = assert_matches_reference("cross_entropy", target, inputs)
    positive = [(w, -lp) for w, lp in zip(inputs["weights"].flatten().tolist(), target.flatten().tolist(),
                                           strict=True) if w > 0]
    expected_nll = sum(w * nll for w, nll in positive) / sum(w for w, _ in positive)
    assert output.metrics["mean_nll:mean"] == pytest.approx(expected_nll, rel=1e-12)
    _, grad = run_with_grad("cross_entropy", target, {})  # missing weights -> ones of shape [T, K]
    assert grad.shape == (9, 4) and torch.equal(grad, -torch.ones(9, 4, dtype=F64))


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_two_dimensional_inputs_work_for_policy_losses(name):
    target, inputs = random_case(name, (6, 3), seed=12)
    assert_matches_reference(name, target, inputs)


# ---------------------------------------------------------------- policy-gradient edge cases

@pytest.mark.parametrize("name", ["importance_sampling", "ppo", "cispo"])
def test_zero_advantages_give_zero_loss_and_gradient(name):
    target, inputs = random_case(name, (40,), seed=13)
    inputs["advantages"] = torch.zeros(40, dtype=F64)
    output, grad = run_with_grad(name, target, inputs)
    assert output.loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert output.metrics.get("clip_fraction:mean", 0.0) == 0.0


def test_dro_zero_advantages_on_policy_gives_zero_loss_and_gradient():
    target, _ = random_case("dro", (40,), seed=13)
    zeros = torch.zeros(40, dtype=F64)
    output, grad = run_with_grad("dro", target, {"logprobs": target.clone(), "advantages": zeros})
    assert output.loss.item() == 0.0 and torch.count_nonzero(grad) == 0


def _ratios_at_and_beyond_bounds() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """Six tokens; per-token bounds built from the very ratio the loss computes, so 'at the bound' is bit-exact."""
    target = torch.tensor([-1.0, -1.2, -0.7, -2.0, -0.5, -1.5], dtype=F64)
    sampler = target - torch.tensor([0.15, 0.3, -0.2, -0.4, 0.35, -0.3], dtype=F64)
    ratio = torch.exp(target - sampler)
    advantages = torch.tensor([1.5, 2.0, -1.0, -0.5, -2.0, 0.7], dtype=F64)
    low, high = torch.full((6,), 0.8, dtype=F64), torch.full((6,), 1.2, dtype=F64)
    high[0] = ratio[0]            # A > 0, r exactly at hi
    high[1] = ratio[1] * 0.999    # A > 0, r just beyond hi
    low[2] = ratio[2]             # A < 0, r exactly at lo
    low[3] = ratio[3] * 1.001     # A < 0, r just beyond lo
    high[4] = ratio[4] * 0.999    # A < 0, r beyond hi: the unclipped term is the pessimistic one
    low[5] = ratio[5] * 1.001     # A > 0, r beyond lo: likewise
    cases = {0: "at hi, A>0", 1: "beyond hi, A>0", 2: "at lo, A<0", 3: "beyond lo, A<0", 4: "beyond hi, A<0",
             5: "beyond lo, A>0"}
    return target, {"logprobs": sampler, "advantages": advantages, LO: low, HI: high}, cases


def test_ppo_gradient_at_and_beyond_the_clip_bounds():
    target, inputs, _ = _ratios_at_and_beyond_bounds()
    output, grad = run_with_grad("ppo", target, inputs)
    full = -inputs["advantages"] * torch.exp(target - inputs["logprobs"])
    # at the bound: full gradient; beyond it in the advantage's direction: none; beyond it against: full.
    expected = torch.stack([full[0], torch.tensor(0.0, dtype=F64), full[2], torch.tensor(0.0, dtype=F64),
                            full[4], full[5]])
    assert torch.allclose(grad, expected, rtol=1e-14, atol=0)
    assert output.metrics["clip_fraction:mean"] == pytest.approx(2 / 6)
    assert_matches_reference("ppo", target, inputs)


def test_ppo_clip_bound_exactly_at_the_ratio_through_config():
    target = torch.tensor([-1.0], dtype=F64)
    sampler = torch.tensor([-1.3], dtype=F64)
    ratio = float(torch.exp(target - sampler))
    advantages = torch.tensor([2.0], dtype=F64)
    at_bound, grad_at = run_with_grad("ppo", target, {"logprobs": sampler, "advantages": advantages},
                                      {LO: 0.5, HI: ratio})
    assert grad_at.item() == pytest.approx(-2.0 * ratio, rel=1e-15)
    _, grad_beyond = run_with_grad("ppo", target, {"logprobs": sampler, "advantages": advantages},
                                   {LO: 0.5, HI: math.nextafter(ratio, 0.0)})
    assert grad_beyond.item() == 0.0
    assert at_bound.metrics["clip_fraction:mean"] == 0.0


def test_cispo_keeps_gradient_beyond_the_bounds_with_the_clipped_weight():
    target, inputs, _ = _ratios_at_and_beyond_bounds()
    output, grad = run_with_grad("cispo", target, inputs)
    ratio = torch.exp(target - inputs["logprobs"])
    clipped = torch.minimum(torch.maximum(ratio, inputs[LO]), inputs[HI])
    assert torch.allclose(grad, -clipped * inputs["advantages"], rtol=1e-14, atol=0)
    assert torch.count_nonzero(grad) == 6  # the clipped ratio is a detached weight: the gradient never vanishes
    assert grad[1].item() == pytest.approx(-inputs[HI][1].item() * 2.0, rel=1e-14)
    assert output.metrics["clip_fraction:mean"] == pytest.approx(4 / 6)  # tokens 1, 3, 4, 5 lie outside
    assert_matches_reference("cispo", target, inputs)


def test_importance_sampling_ignores_inputs_it_does_not_read():
    target, inputs = random_case("importance_sampling", (10,), seed=14)
    plain = compute_loss("importance_sampling", target, inputs, None).loss
    extra = {**inputs, "weights": torch.full((10,), 7.0), "sequence_ratio_mask": torch.ones(3)}
    assert compute_loss("importance_sampling", target, extra, None).loss.item() == plain.item()


# ---------------------------------------------------------------- validation

def _ppo_inputs(n: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return random_case("ppo", (n,), seed=21)


@pytest.mark.parametrize(
    ("mutate", "config", "message"),
    [
        (lambda x: x.pop("advantages"), None, r"requires loss_fn_inputs\['advantages'\]"),
        (lambda x: x.update(advantages=torch.zeros(6)), None, r"advantages has shape \[6\] but target_logprobs"),
        (lambda x: x.update(logprobs=torch.zeros(5, 1)), None, r"logprobs has shape \[5, 1\]"),
        (lambda x: x["advantages"].__setitem__(3, math.nan), None, "advantages contains NaN at position 3"),
        (lambda x: x["logprobs"].__setitem__(0, math.inf), None, "logprobs contains inf at position 0"),
        (lambda x: x["logprobs"].__setitem__(4, -math.inf), None, "logprobs contains -inf at position 4"),
        (lambda x: x.update({LO: torch.ones(4)}), None, r"clip_low_threshold has shape \[4\]"),
        (lambda x: x.update({HI: torch.tensor([1.2, 1.2, 0.5, 1.2, 1.2])}), None,
         "clip_low_threshold is greater than clip_high_threshold at position 2"),
        (lambda x: None, {LO: 1.3, HI: 1.2}, "clip_low_threshold is greater than clip_high_threshold"),
        (lambda x: None, {HI: 0.5}, "clip_low_threshold is greater than clip_high_threshold"),
        (lambda x: None, {"clip_ratio": 0.2}, "unknown loss_fn_config key 'clip_ratio' for loss_fn 'ppo'"),
        (lambda x: None, {LO: "0.8"}, r"loss_fn_config\['clip_low_threshold'\] must be a finite number"),
        (lambda x: None, {HI: True}, r"loss_fn_config\['clip_high_threshold'\] must be a finite number"),
        (lambda x: None, {HI: math.nan}, r"loss_fn_config\['clip_high_threshold'\] must be a finite number"),
        (lambda x: x.update(advantages=["a"] * 5), None, "advantages is not a numeric tensor"),
    ],
)
def test_ppo_rejects_bad_input_naming_the_field(mutate, config, message, finite_checks):
    target, inputs = _ppo_inputs()
    mutate(inputs)
    with pytest.raises(LossInputError, match=message):
        compute_loss("ppo", target, inputs, config)


@pytest.fixture(params=["at once", "deferred"])
def finite_checks(request, monkeypatch):
    """Finiteness checked at once (the CPU's way) or queued and read back after the loss (an accelerator's way):
    the same inputs must give the same error either way."""
    if request.param == "deferred":
        from loss_plugins import checks

        init = checks.FiniteChecks.__init__
        monkeypatch.setattr(checks.FiniteChecks, "__init__", lambda self, defer=None: init(self, defer=True))
    return request.param


def test_a_non_finite_input_wins_over_a_later_error_when_deferred(finite_checks, scratch_registry):
    target, inputs = _ppo_inputs()
    inputs["logprobs"][1] = math.nan
    inputs["advantages"] = torch.zeros(6)  # checked after logprobs: at once it never gets that far
    with pytest.raises(LossInputError, match="logprobs contains NaN at position 1"):
        compute_loss("ppo", target, inputs, None)

    def failing(target_logprobs, inputs, config):
        raise ValueError("the loss function choked on NaN")

    register_loss("choking", failing, description="fails", input_defaults={"weights": 1.0}, replace=True)
    with pytest.raises(LossInputError, match="target_logprobs contains NaN at position 0"):
        compute_loss("choking", torch.tensor([math.nan, -1.0]), {}, None)


def test_rejections_for_other_losses_name_the_field(finite_checks):
    target = -torch.rand(3, 4, dtype=F64)
    weights = torch.ones(3, 4, dtype=F64)
    weights[1, 2] = math.nan
    with pytest.raises(LossInputError, match=r"weights contains NaN at position \(1, 2\)"):
        compute_loss("cross_entropy", target, {"weights": weights}, None)
    with pytest.raises(LossInputError, match="unknown loss_fn_config key 'beta' for loss_fn 'cross_entropy'"):
        compute_loss("cross_entropy", target, {}, {"beta": 0.1})
    with pytest.raises(LossInputError, match=r"loss_fn_config\['beta'\] must be a finite number"):
        compute_loss("dro", target, {"logprobs": target, "advantages": weights.nan_to_num()}, {"beta": None})
    with pytest.raises(LossInputError, match="target_logprobs contains NaN at position 0"):
        compute_loss("cross_entropy", torch.tensor([math.nan, -1.0]), {}, None)
    with pytest.raises(LossInputError, match=r"target_logprobs must be \[T\] or \[T, K\]"):
        compute_loss("cross_entropy", torch.zeros(2, 2, 2), {}, None)
    with pytest.raises(LossInputError, match="target_logprobs must be a floating-point tensor"):
        compute_loss("cross_entropy", torch.zeros(3, dtype=torch.int64), {}, None)
    for name in POLICY_LOSSES:
        with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\['logprobs'\]"):
            compute_loss(name, target, {"advantages": weights.nan_to_num()}, None)


def test_validation_errors_are_value_errors():
    assert issubclass(LossInputError, ValueError) and issubclass(UnknownLoss, ValueError)


def test_unknown_loss_lists_the_known_names():
    with pytest.raises(UnknownLoss) as raised:
        get_loss("reinforce++")
    assert "reinforce++" in str(raised.value)
    for name in BUILTINS:
        assert name in str(raised.value)
    with pytest.raises(UnknownLoss):
        compute_loss("nope", torch.zeros(2, dtype=F64), {}, None)


# ---------------------------------------------------------------- registry

def test_builtins_are_listed_with_one_line_descriptions_and_protocol_defaults():
    specs = {spec.name: spec for spec in list_losses()}
    assert set(BUILTINS) <= set(specs)
    for name in BUILTINS:
        assert specs[name].description and "\n" not in specs[name].description
        assert dict(specs[name].config_defaults) == PROTOCOL_DEFAULTS[name]
    assert specs["cross_entropy"].required_inputs == ()
    assert all(specs[name].required_inputs == ("logprobs", "advantages") for name in POLICY_LOSSES)


def _scaled_error(target_logprobs, inputs, config) -> LossOutput:
    loss = (config["scale"] * inputs["mask"] * (target_logprobs - inputs["goal"]) ** 2).sum()
    return LossOutput(loss, {"loss:sum": float(loss.detach()), "tokens:sum": float(inputs["mask"].sum())})


def test_register_get_list_and_compute_a_custom_loss(scratch_registry):
    spec = register_loss("scaled_error", _scaled_error, description="Σ scale·mask·(ℓ − goal)²",
                         required_inputs=("goal",), config_defaults={"scale": 2.0}, input_defaults={"mask": 1.0})
    assert get_loss("scaled_error") is spec
    assert "scaled_error" in [s.name for s in list_losses()]
    target = torch.tensor([-1.0, -2.0, -0.5], dtype=F64)
    goal = torch.tensor([-1.5, -1.0, -0.5], dtype=F64)
    output, grad = run_with_grad("scaled_error", target, {"goal": goal})
    assert output.loss.item() == pytest.approx(2.0 * (0.25 + 1.0 + 0.0))
    assert output.metrics["tokens:sum"] == 3.0
    assert grad.tolist() == pytest.approx([2.0 * 2 * 0.5, 2.0 * 2 * -1.0, 0.0])
    masked = compute_loss("scaled_error", target, {"goal": goal, "mask": torch.tensor([0.0, 1.0, 1.0])},
                          {"scale": 3})
    assert masked.loss.item() == pytest.approx(3.0)
    with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\['goal'\]"):
        compute_loss("scaled_error", target, {}, None)
    with pytest.raises(LossInputError, match="unknown loss_fn_config key 'beta'"):
        compute_loss("scaled_error", target, {"goal": goal}, {"beta": 1.0})


def test_register_refuses_duplicates_unless_replacing(scratch_registry):
    with pytest.raises(ValueError, match="'ppo' is already registered"):
        register_loss("ppo", _scaled_error, description="not ppo")
    replacement = register_loss("ppo", _scaled_error, description="not ppo", required_inputs=("goal",),
                                config_defaults={"scale": 1.0}, input_defaults={"mask": 1.0}, replace=True)
    assert get_loss("ppo") is replacement
    with pytest.raises(ValueError, match="default for 'scale' must be a finite number"):
        register_loss("bad_default", _scaled_error, description="x", config_defaults={"scale": "big"})
    with pytest.raises(TypeError, match="fn must be callable"):
        register_loss("not_callable", 42, description="x")  # type: ignore[arg-type]


def test_registered_spec_defaults_are_frozen(scratch_registry):
    defaults = {"scale": 2.0}
    spec = register_loss("frozen_check", _scaled_error, description="x", config_defaults=defaults)
    defaults["scale"] = 99.0
    assert spec.config_defaults["scale"] == 2.0
    with pytest.raises(TypeError):
        spec.config_defaults["scale"] = 5.0  # type: ignore[index]


@pytest.mark.parametrize(
    ("metrics", "message"),
    [({}, "no 'loss:sum' metric"), ({"loss:sum": 0.0, "loss": 0.0}, "metric key 'loss'"),
     ({"loss:sum": 0.0, "a:b:mean": 0.0}, "metric key 'a:b:mean'")],
)
def test_a_plugin_with_malformed_metrics_fails_on_the_server(scratch_registry, metrics, message):
    register_loss("bad_metrics", lambda lp, inputs, config: LossOutput(lp.sum(), metrics), description="x")
    with pytest.raises(ValueError, match=message):
        compute_loss("bad_metrics", torch.zeros(2, dtype=F64), {}, None)


PLUGIN_MODULE = "tb_test_loss_plugin"
PLUGIN_SOURCE = '''
import torch
from loss_plugins import LossOutput, LossSpec, register_loss

CALLS = []

def _double_ce(target_logprobs, inputs, config):
    loss = -2.0 * (inputs["weights"] * target_logprobs).sum()
    return LossOutput(loss, {"loss:sum": float(loss.detach())})

SPEC = LossSpec("double_ce", _double_ce, "Twice the cross-entropy.", input_defaults={"weights": 1.0})
NOT_A_LOSS = 42
FAKE_PPO = LossSpec("ppo", _double_ce, "An impostor.")

def register():
    CALLS.append(1)
    register_loss("plugin_is", lambda lp, inputs, config: LossOutput(lp.sum() * 0, {"loss:sum": 0.0}),
                  description="Registered by a callable.", required_inputs=("advantages",))
'''


def test_entry_point_plugins_load_lazily_once_and_broken_ones_are_skipped(scratch_registry, tmp_path, monkeypatch,
                                                                          caplog):
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist_info = tmp_path / "tb_test_loss_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-test-loss-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [{ENTRY_POINT_GROUP}]
        double_ce = {PLUGIN_MODULE}:SPEC
        plugin_is = {PLUGIN_MODULE}:register
        missing_module = tb_no_such_module_anywhere:SPEC
        not_a_loss = {PLUGIN_MODULE}:NOT_A_LOSS
        impostor = {PLUGIN_MODULE}:FAKE_PPO
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)

    register_loss("registered_first", _scaled_error, description="x")  # registering does not load plugins
    assert PLUGIN_MODULE not in sys.modules

    with caplog.at_level(logging.WARNING, logger=loss_registry.__name__):
        names = [spec.name for spec in list_losses()]
    assert {"double_ce", "plugin_is", "registered_first", *BUILTINS} <= set(names)
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "missing_module" in warned and "not_a_loss" in warned and "impostor" in warned
    assert get_loss("ppo").description != "An impostor."  # a plugin cannot silently hijack a built-in

    plugin = sys.modules[PLUGIN_MODULE]
    get_loss("double_ce")
    list_losses()
    assert plugin.CALLS == [1]  # loaded once, not on every lookup

    target = torch.tensor([-1.0, -3.0], dtype=F64)
    assert compute_loss("double_ce", target, {}, None).loss.item() == pytest.approx(8.0)
    with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\['advantages'\]"):
        compute_loss("plugin_is", target, {}, None)


def test_spec_lists_every_input_it_reads():
    ppo_spec = get_loss("ppo")
    assert set(ppo_spec.accepted_inputs) == {"logprobs", "advantages", LO, HI}
    assert isinstance(ppo_spec, LossSpec)
    assert set(get_loss("cross_entropy").accepted_inputs) == {"weights"}
