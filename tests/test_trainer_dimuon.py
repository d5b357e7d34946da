"""Dimuon (trainer_consumer/backends/dimuon.py): one and two steps against a float64 reference written from the
formulas (momentum EMA, global-norm clip, the polar factor from an eigendecomposition), and its state round trip."""

from __future__ import annotations

import pytest
import torch

from bus_events import payloads as p
from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.dimuon import DimuonOptimizer, matrix_sign
from trainer_consumer.backends.optimizers import make_optimizer, step

F64 = torch.float64


def polar(m: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ of a full-row-rank [r, d] (r ≤ d) matrix as (M·Mᵀ)^(-1/2)·M, or of its transpose."""
    if m.shape[0] > m.shape[1]:
        return polar(m.T).T
    values, vectors = torch.linalg.eigh(m @ m.T)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T @ m


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.nn.Parameter(torch.randn(4, 9, generator=g, dtype=F64)),
            "x.lora_B.weight": torch.nn.Parameter(torch.randn(7, 4, generator=g, dtype=F64))}


def _grads(params, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}


def test_matrix_sign_is_the_polar_factor_with_frobenius_norm_sqrt_rank():
    m = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    sign = matrix_sign(m)
    torch.testing.assert_close(sign, polar(m).to(sign.dtype), atol=1e-5, rtol=1e-5)  # float32 SVD inside
    assert torch.linalg.matrix_norm(sign.double()).item() == pytest.approx(2.0, rel=1e-5)  # sqrt(rank 4)
    assert torch.equal(matrix_sign(torch.zeros(3, 5)), torch.zeros(3, 5))  # no direction, no step


def test_two_steps_match_the_reference():
    params = _params(1)
    start = {k: v.detach().clone() for k, v in params.items()}
    opt = DimuonOptimizer(params)
    settings = [p.DimuonParams(learning_rate=0.05, grad_clip_norm=1.5, beta1=0.8),
                p.DimuonParams(learning_rate=0.02, beta1=0.8)]
    weights, momentum = dict(start), {k: torch.zeros_like(v) for k, v in start.items()}
    for i, setting in enumerate(settings):
        grads = _grads(params, 10 + i)
        for key, param in params.items():
            param.grad = grads[key].clone()
        metrics = opt.step(setting)
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values())).item()
        scale = min(1.0, setting.grad_clip_norm / (norm + 1e-6)) if setting.grad_clip_norm > 0 else 1.0
        for key in weights:
            momentum[key] = setting.beta1 * momentum[key] + (1 - setting.beta1) * scale * grads[key]
            weights[key] = weights[key] - setting.learning_rate * polar(momentum[key])
        for key, param in params.items():
            torch.testing.assert_close(param.detach(), weights[key], atol=1e-5, rtol=1e-5)
            assert param.grad is None
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-9)
        assert metrics["grad_norm_clipped"] == pytest.approx(min(norm, setting.grad_clip_norm) if scale < 1 else norm)
        assert metrics["learning_rate"] == setting.learning_rate


def test_state_round_trip_resumes_the_same_trajectory():
    first, second = _params(2), _params(2)
    a = DimuonOptimizer(first)
    assert a.export_state() == {}
    for key, param in first.items():
        param.grad = _grads(first, 3)[key]
    a.step(p.DimuonParams(learning_rate=0.1))
    b = DimuonOptimizer(second)
    with torch.no_grad():
        for key in second:
            second[key].copy_(first[key])
    b.import_state(a.export_state())
    for opt, params in ((a, first), (b, second)):
        for key, param in params.items():
            param.grad = _grads(params, 4)[key]
        opt.step(p.DimuonParams(learning_rate=0.1))
    for key in first:
        torch.testing.assert_close(first[key].detach(), second[key].detach())
    assert b.steps == 2


def test_families_do_not_mix():
    params = _params(5)
    with pytest.raises(BackendInputError, match="not Dimuon state"):
        DimuonOptimizer(params).import_state({"x.lora_A.weight.exp_avg": torch.zeros(4, 9)})
    with pytest.raises(BackendInputError, match="DimuonParams step for a AdapterOptimizer"):
        step(make_optimizer("adamw", params), p.DimuonParams(learning_rate=0.1))
    with pytest.raises(BackendInputError, match="not one of"):
        make_optimizer("sgd", params)


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": -1.0}, "learning_rate must be >= 0"),
    ({"learning_rate": 0.1, "beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ({"learning_rate": float("nan")}, "learning_rate must be finite"),
])
def test_dimuon_params_are_checked_naming_the_field(values, message):
    import msgspec

    with pytest.raises(msgspec.ValidationError, match=message):
        p.DimuonParams(**values)
