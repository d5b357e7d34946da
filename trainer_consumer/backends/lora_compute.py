"""The LoRA forward the HF backend trains with: PEFT's lora.Linear, made faster for the plain case.

PEFT computes the LoRA branch in the adapter's dtype (fp32 here), so every wrapped layer casts its bf16 input to
fp32, runs two fp32 GEMMs and adds the fp32 result back: memory traffic and slow GEMMs on every projection. This
forward keeps the fp32 adapter weights (the optimizer's master copy, gradients arrive in fp32 through the cast)
but computes in the activations' dtype, and folds `result + scale * low @ B^T` into one addmm.

The weights come from `use()`, set per op by the backend, not from PEFT's active adapter names: a compiled
decoder layer then sees tensors, not a changing string, and does not recompile for each adapter.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

ActiveLora = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scale)


class FusedLoraLinear(PeftLoraLinear):
    tb_lora: ActiveLora | None = None  # what `use` set; None = the base layer alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.tb_lora is None:
            return result
        a, b, scale = self.tb_lora
        low = F.linear(x, a.to(x.dtype))
        fused = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), b.to(x.dtype).t(),
                            alpha=scale)
        return fused.view(result.shape)


def adopt(model: nn.Module) -> list[FusedLoraLinear]:
    """Every plain PEFT lora.Linear of `model` switched to FusedLoraLinear (same object, same state)."""
    layers = []
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
        if isinstance(module, FusedLoraLinear):
            layers.append(module)
    return layers


def use(layers: Iterable[FusedLoraLinear], adapter: str | None) -> None:
    """Make `layers` apply PEFT adapter `adapter` (None: none) in their next forward passes."""
    for layer in layers:
        if adapter is None or adapter not in layer.lora_A:
            layer.tb_lora = None
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        layer.tb_lora = (a, b, float(layer.scaling[adapter]))


def frozen_weight(unembed: nn.Module) -> torch.Tensor | None:
    """The unembedding's weight matrix when it is frozen and bias-free with no LoRA applied, else None."""
    if isinstance(unembed, FusedLoraLinear):
        if unembed.tb_lora is not None:
            return None
        unembed = unembed.base_layer
    if type(unembed) is not nn.Linear or unembed.bias is not None or unembed.weight.requires_grad:
        return None
    return unembed.weight
