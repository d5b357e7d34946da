"""AdapterOptimizer's fused step (the GPU's: one kernel for every parameter) against the multi-tensor step it
replaced, through a moments export and import mid-run (a snapshot restore). torch also fuses on the CPU, which is
how this machine runs the fused path."""

from __future__ import annotations

import torch

from bus_events import payloads as p
from trainer_consumer.backends.adamw import AdapterOptimizer

ADAM = p.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0, weight_decay=0.01)


def trained(fused: bool) -> tuple[torch.Tensor, dict[str, float]]:
    torch.manual_seed(0)
    params = {f"layers.{i}.lora_A.weight": torch.nn.Parameter(torch.randn(64, 32)) for i in range(4)}
    optimizer = AdapterOptimizer(params)
    assert not optimizer.fused  # CPU parameters: the multi-tensor step unless told otherwise
    optimizer.fused = fused
    optimizer.optimizer = optimizer._fresh()
    metrics: dict[str, float] = {}
    for step in range(3):
        for i, param in enumerate(params.values()):
            param.grad = torch.full_like(param, 0.1 * (i + 1) * (step + 1))
        metrics = optimizer.step(ADAM)
        if step == 1:
            optimizer.import_state(optimizer.export_state())
    return torch.cat([param.detach().flatten() for param in params.values()]), metrics


def test_the_fused_step_moves_the_weights_as_the_multi_tensor_step_does_across_a_restore():
    fused, fused_metrics = trained(fused=True)
    plain, plain_metrics = trained(fused=False)
    assert fused_metrics == plain_metrics
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    start = torch.cat([torch.randn(64, 32).flatten() for _ in range(4)])
    assert (plain - start).abs().min() > 1e-3  # every weight moved: the steps were applied
