"""Reference logits for merge tests: base + adapter through PEFT itself, and a merged folder through plain
transformers, on one fixed token sequence."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7, 250, 3]])


def peft_logits(base: Path, config: dict, weights: dict[str, torch.Tensor], where: Path) -> torch.Tensor:
    """Logits of base + adapter through PEFT itself, the reference the merge must reproduce."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    where.mkdir(parents=True, exist_ok=True)
    (where / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(where / "adapter_model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), where)
    with torch.no_grad():
        return model(TOKENS).logits


def merged_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS).logits


def randomise(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA matrices; saved base_layer weights (PEFT's embedding layers) stay the base's."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) if ".lora_" in k else v.clone() for k, v in weights.items()}
