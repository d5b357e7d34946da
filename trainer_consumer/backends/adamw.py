"""One adapter's AdamW: steps with Tinker's AdamParams, and its moments keyed by PEFT parameter name.

Backend-neutral (plain torch), so every backend steps, clips and checkpoints optimizers the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from bus_events import payloads as p
from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.host_copy import to_host

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step")


class NonFiniteGradients(RuntimeError):
    pass


def zero_grads(params: Mapping[str, torch.nn.Parameter]) -> None:
    for param in params.values():
        param.grad = None


def clip_global_norm(params: Mapping[str, torch.nn.Parameter], max_norm: float) -> float:
    """The accumulated gradients' global norm, after scaling them down to `max_norm` when it is > 0. Non-finite
    gradients are discarded and raise NonFiniteGradients: the step is skipped, the weights left unchanged."""
    grads = [param.grad for param in params.values() if param.grad is not None]
    grad_norm = float(get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(grad_norm):
        zero_grads(params)
        raise NonFiniteGradients(f"the accumulated gradients are not finite (grad_norm={grad_norm}); the step was "
                                 "skipped, the gradients discarded and the weights left unchanged")
    if max_norm > 0 and grads:
        clip_grads_with_norm_(list(params.values()), max_norm, torch.tensor(grad_norm))
    return grad_norm


class AdapterOptimizer:
    def __init__(self, params: Mapping[str, torch.nn.Parameter]):
        self.params = dict(params)  # PEFT key name -> trainable parameter
        # On the GPU one fused kernel steps every parameter: the multi-tensor (foreach) step is a few dozen launches
        # per optim_step, host work that waits whenever the trainer's event loop holds the GIL (issue 14).
        self.fused = bool(self.params) and all(param.is_cuda for param in self.params.values())
        self.optimizer = self._fresh()

    def _fresh(self) -> torch.optim.AdamW:
        # Hyper-parameters are set from each optim_step's AdamParams; these are only placeholders.
        return torch.optim.AdamW(list(self.params.values()), lr=0.0, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0,
                                 fused=self.fused or None)

    def zero_grad(self) -> None:
        zero_grads(self.params)

    def step(self, adam: p.AdamParams) -> dict[str, float]:
        grad_norm = clip_global_norm(self.params, adam.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.optimizer.step()
        self.zero_grad()
        return {
            "grad_norm": grad_norm,
            "grad_norm_clipped": min(grad_norm, adam.grad_clip_norm) if adam.grad_clip_norm > 0 else grad_norm,
            "learning_rate": float(adam.learning_rate),
        }

    def export_state(self) -> dict[str, torch.Tensor]:
        """CPU copies of the moments (one batched device -> host copy, see host_copy.py)."""
        live: dict[str, torch.Tensor] = {}
        for key, param in self.params.items():
            state = self.optimizer.state.get(param)
            if not state:
                continue
            live[f"{key}.exp_avg"] = state["exp_avg"]
            live[f"{key}.exp_avg_sq"] = state["exp_avg_sq"]
            live[f"{key}.step"] = torch.as_tensor(state["step"], dtype=torch.float32)
        return to_host(live)

    def import_state(self, state: Mapping[str, torch.Tensor] | None) -> None:
        """Replace the moments (None or {}: start fresh). Every name must belong to this adapter."""
        self.optimizer = self._fresh()
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in (state or {}).items():
            key, _, moment = name.rpartition(".")
            if moment not in MOMENT_KEYS or key not in self.params:
                raise BackendInputError(f"optimizer state entry {name!r} does not match any parameter of this adapter")
            grouped.setdefault(key, {})[moment] = tensor
        for key, moments in grouped.items():
            param = self.params[key]
            if set(moments) != set(MOMENT_KEYS):
                raise BackendInputError(f"optimizer state for {key!r} has {sorted(moments)}, needs {list(MOMENT_KEYS)}")
            for moment in ("exp_avg", "exp_avg_sq"):
                if moments[moment].shape != param.shape:
                    raise BackendInputError(f"optimizer state {key}.{moment} has shape {list(moments[moment].shape)}, "
                                            f"the parameter has {list(param.shape)}")
            self.optimizer.state[param] = {  # the fused step keeps its step count beside the parameter
                "step": moments["step"].detach().to(param.device if self.fused else "cpu", torch.float32)
                                       .reshape(()).clone(),
                "exp_avg": moments["exp_avg"].detach().to(param.device, param.dtype).clone(),
                "exp_avg_sq": moments["exp_avg_sq"].detach().to(param.device, param.dtype).clone(),
            }
