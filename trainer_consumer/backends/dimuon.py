"""One adapter's Dimuon (SDK 0.38 DimuonOptimizerConfig version 1, DimuonParams): momentum, then an orthogonalised
step per LoRA matrix, with its state keyed by PEFT parameter name like AdapterOptimizer's moments.

Tinker documents Dimuon's parameters, not its algorithm. What they pin down: a momentum EMA with coefficient
beta1, a global gradient-norm clip, and "a learning rate applied to a direction with Frobenius norm sqrt(rank)"
obtained by a matrix-sign iteration. The matrix sign (polar factor U·Vᵀ of M = U·S·Vᵀ) of a rank-r LoRA matrix
([r, in] or [out, r]) has r unit singular values, so exactly that norm. Per step, with G the (clipped) gradient:

    M ← beta1·M + (1 − beta1)·G          W ← W − learning_rate · msign(M)

msign is computed exactly by SVD (LoRA matrices are thin: the SVD of [r, d] costs O(r²d)), where Tinker uses an
iteration: directions whose singular value is below `RANK_EPS` of the largest are dropped (a zero momentum, such
as lora_A's before lora_B has moved, gives a zero step). 0.38 has no damping and no rank correction of the
learning rate (later SDKs add both), so neither is applied. Docs: docs/events.md `DimuonParams`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bus_events import payloads as p
from trainer_consumer.backends.adamw import clip_global_norm, zero_grads
from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.host_copy import to_host

STATE_KEYS = ("momentum", "step")
RANK_EPS = 1e-7


def matrix_sign(m: torch.Tensor) -> torch.Tensor:
    """The polar factor U·Vᵀ of a 2-D `m` (float32 math), zero along directions with no singular value."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    keep = (s > RANK_EPS * s.max()) if s.numel() and bool(s.max() > 0) else torch.zeros_like(s, dtype=torch.bool)
    return ((u * keep.to(u.dtype)) @ vh).to(m.dtype)


class DimuonOptimizer:
    def __init__(self, params: Mapping[str, torch.nn.Parameter]):
        self.params = dict(params)  # PEFT key name -> trainable parameter (every LoRA parameter is 2-D)
        self.momentum: dict[str, torch.Tensor] = {}
        self.steps = 0

    def zero_grad(self) -> None:
        zero_grads(self.params)

    def step(self, params: p.DimuonParams) -> dict[str, float]:
        grad_norm = clip_global_norm(self.params, params.grad_clip_norm)
        clip = params.grad_clip_norm > 0
        with torch.no_grad():
            for key, param in self.params.items():
                if param.grad is None:
                    continue
                momentum = self.momentum.get(key)
                if momentum is None:
                    momentum = self.momentum[key] = torch.zeros_like(param, dtype=torch.float32)
                momentum.mul_(params.beta1).add_(param.grad.float(), alpha=1 - params.beta1)
                param.sub_(params.learning_rate * matrix_sign(momentum).to(param.dtype))
        self.steps += 1
        self.zero_grad()
        return {
            "grad_norm": grad_norm,
            "grad_norm_clipped": min(grad_norm, params.grad_clip_norm) if clip else grad_norm,
            "learning_rate": float(params.learning_rate),
        }

    def export_state(self) -> dict[str, torch.Tensor]:
        """CPU copies: each parameter's momentum and the step count (empty before the first step)."""
        live: dict[str, torch.Tensor] = {f"{key}.momentum": m for key, m in self.momentum.items()}
        for key in self.momentum:
            live[f"{key}.step"] = torch.tensor(float(self.steps))
        return to_host(live)

    def import_state(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Replace the state (None or {}: start fresh). Every name must be a Dimuon entry of this adapter."""
        momentum: dict[str, torch.Tensor] = {}
        steps = 0
        for name, tensor in (state or {}).items():
            key, _, kind = name.rpartition(".")
            if kind not in STATE_KEYS or key not in self.params:
                raise BackendInputError(f"optimizer state entry {name!r} is not Dimuon state of this adapter (a "
                                        "checkpoint of an AdamW model cannot resume a Dimuon model's optimizer)")
            if kind == "step":
                steps = int(tensor.reshape(()).item())
                continue
            param = self.params[key]
            if tensor.shape != param.shape:
                raise BackendInputError(f"optimizer state {name} has shape {list(tensor.shape)}, the parameter has "
                                        f"{list(param.shape)}")
            momentum[key] = tensor.detach().to(param.device, torch.float32).clone()
        self.momentum, self.steps = momentum, steps
