"""The built-in losses (Tinker's five, plus dpo) as descriptions (name, inputs, defaults), torch-free: the gateway
validates loss names and config against them without loading torch. Each one's function (builtin.py, dpo.py) is
imported on its first call."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loss_plugins.spec import LossOutput, LossSpec

if TYPE_CHECKING:
    import torch

CLIP_LOW = "clip_low_threshold"
CLIP_HIGH = "clip_high_threshold"
SEQUENCE_RATIO_MASK = "sequence_ratio_mask"


@dataclass(frozen=True)
class _Builtin:
    """A built-in loss function by name, resolved in its module (loss_plugins.builtin by default) when first called."""

    name: str
    module: str = "loss_plugins.builtin"

    def __call__(self, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str]) -> LossOutput:
        fn = getattr(importlib.import_module(self.module), self.name)
        return fn(target_logprobs, inputs, config)


_POLICY_INPUTS = ("logprobs", "advantages")

BUILTIN_LOSSES: tuple[LossSpec, ...] = (
    LossSpec("cross_entropy", _Builtin("cross_entropy"),
             "Weighted negative log-likelihood −Σ w·ℓ (missing weights = 1).",
             input_defaults={"weights": 1.0}),
    LossSpec("importance_sampling", _Builtin("importance_sampling"),
             "Off-policy REINFORCE −Σ exp(ℓ − s)·A with sampler logprobs s and advantages A.",
             required_inputs=_POLICY_INPUTS),
    LossSpec("ppo", _Builtin("ppo"), "PPO clipped objective −Σ min(r·A, clip(r, lo, hi)·A), r = exp(ℓ − s).",
             required_inputs=_POLICY_INPUTS, config_defaults={CLIP_LOW: 0.8, CLIP_HIGH: 1.2}),
    LossSpec("cispo", _Builtin("cispo"), "CISPO −Σ sg[clip(r, lo, hi)]·ℓ·A, the clipped ratio detached.",
             required_inputs=_POLICY_INPUTS, config_defaults={CLIP_LOW: 0.0, CLIP_HIGH: 4.0}),
    # The protocol leaves DRO's default β undocumented; 0.05 is the value of the official docs' example.
    LossSpec("dro", _Builtin("dro"),
             "DRO −Σ (ℓ·A − ½β(ℓ − s)²), quadratic penalty on drift from the sampler (β = 0.05).",
             required_inputs=_POLICY_INPUTS, config_defaults={"beta": 0.05}),
    # The GSPO paper's clip range ε_low = 3e-4, ε_high = 4e-4 (Zheng et al. 2025, §5.1), as ratio bounds like ppo's.
    LossSpec("gspo", _Builtin("gspo"),
             "GSPO-token −Σ min(s_t·A, clip(s_t, lo, hi)·A): s_t carries the datum's sequence ratio (geometric mean "
             "of exp(ℓ − s) over sequence_ratio_mask, default all tokens) with ℓ_t's own gradient.",
             required_inputs=_POLICY_INPUTS, config_defaults={CLIP_LOW: 1.0 - 3e-4, CLIP_HIGH: 1.0 + 4e-4},
             input_defaults={SEQUENCE_RATIO_MASK: 1.0}, per_datum=True),
    # Not a Tinker built-in: the datum layout (pairs marked by dpo_pair) is documented in loss_plugins/dpo.py.
    # β = 0.1 is the DPO paper's and the cookbook's default.
    LossSpec("dpo", _Builtin("dpo", "loss_plugins.dpo"),
             "DPO Σ_pairs −log σ(β·(Δ⁺ − Δ⁻)), Δ = Σ w·(ℓ − ref_logprobs) over a datum; dpo_pair = +k on the chosen "
             "datum's tokens, −k on the rejected one's (β = 0.1).",
             required_inputs=("ref_logprobs", "dpo_pair"), config_defaults={"beta": 0.1},
             input_defaults={"weights": 1.0}),
)

# Names of SDK 0.38's LossFnType that this server does not compute, and why: get_loss answers with the reason.
UNSERVED_LOSSES: Mapping[str, str] = {
    "stable_reinforce": "its objective is not published, and it needs per-sequence stability info recorded at "
                        "sampling time (record_stability_info), which this server's sampler does not record; use "
                        "ppo, cispo or gspo for off-policy RL",
}
