"""One adapter's Dimuon (SDK 0.38 DimuonOptimizerConfig version 1, DimuonParams): momentum, then an orthogonalised
step per LoRA matrix, with its state keyed by PEFT parameter name like AdapterOptimizer's moments.

Tinker documents Dimuon's parameters, not its algorithm. What they pin down: a momentum EMA with coefficient
beta1, a global gradient-norm clip, and "a learning rate applied to a direction with Frobenius norm sqrt(rank)"
obtained by a matrix-sign iteration. The matrix sign (polar factor U·Vᵀ of M = U·S·Vᵀ) of a rank-r LoRA matrix
([r, in] or [out, r]) has r unit singular values, so exactly that norm. Per step, with G the (clipped) gradient:

    M ← beta1·M + (1 − beta1)·G          W ← W − learning_rate · msign(M)

msign is computed exactly (through the r×r Gram matrix: LoRA matrices are thin), where Tinker uses an iteration:
directions whose singular value is below `RANK_EPS` of the largest are dropped (a zero momentum, such
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
    """The polar factor U·Vᵀ of each matrix of `m` ([..., a, b]), zero along directions with no singular value.
    A LoRA matrix is thin ([r, d] or [d, r], r ≪ d), so this goes through its r×r Gram matrix: with
    M·Mᵀ = V·diag(s²)·Vᵀ (float64, so that s² keeps the small singular values), U·Vᵀ = V·diag(1/s)·Vᵀ·M."""
    if m.shape[-2] > m.shape[-1]:
        return matrix_sign(m.mT).mT
    wide = m.double()
    squares, vectors = torch.linalg.eigh(wide @ wide.mT)
    top = squares.amax(dim=-1, keepdim=True) if squares.shape[-1] else squares
    keep = (squares > (RANK_EPS ** 2) * top) & (top > 0)
    inverse_root = torch.where(keep, squares.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0.0)
    return ((vectors * inverse_root.unsqueeze(-2)) @ vectors.mT).to(m.dtype) @ m


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
            same_shape: dict[tuple[int, ...], list[str]] = {}
            for key, param in self.params.items():
                if param.grad is None:
                    continue
                momentum = self.momentum.get(key)
                if momentum is None:
                    momentum = self.momentum[key] = torch.zeros_like(param, dtype=torch.float32)
                momentum.mul_(params.beta1).add_(param.grad.float(), alpha=1 - params.beta1)
                same_shape.setdefault(tuple(param.shape), []).append(key)
            for keys in same_shape.values():  # one batched decomposition per shape, not one per matrix
                signs = matrix_sign(torch.stack([self.momentum[key] for key in keys]))
                for key, sign in zip(keys, signs, strict=True):
                    self.params[key].sub_(params.learning_rate * sign.to(self.params[key].dtype))
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
