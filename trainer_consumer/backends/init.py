"""The deterministic LoRA initialisation every backend shares: the same seed gives the same adapter in any backend,
at any tensor-parallel size, whatever else is loaded (the basis of replay)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch


def seeded_init(params: Mapping[str, torch.Tensor], seed: int) -> None:
    """lora_A ~ kaiming_uniform(a=sqrt(5)) (PEFT's default), lora_B = 0, from per-parameter CPU generators."""
    with torch.no_grad():
        for key, param in params.items():
            if ".lora_B." in key:
                param.zero_()
                continue
            digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            fan_in = param.shape[1]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a = sqrt(5) gives bound = 1 / sqrt(fan_in)
            values = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            param.copy_(values.to(param.device, param.dtype))
