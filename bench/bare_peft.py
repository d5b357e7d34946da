"""The baseline users compare us with: a plain transformers + PEFT training loop on the same GPU.

bf16 base, LoRA r=32 on every linear layer of the blocks, SDPA attention, fused AdamW, sum-reduced
cross-entropy through the model's own `labels` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_bare_step(model_dir: Path, device: str, batch: torch.Tensor, rank: int = 32):
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                              fused=device.startswith("cuda"))
    input_ids = batch.to(device)

    def step() -> None:
        out = model(input_ids=input_ids, labels=input_ids)
        # HF's loss is a token mean; scale to the sum Tinker uses so both do the same arithmetic.
        (out.loss * input_ids.numel()).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return model, step
