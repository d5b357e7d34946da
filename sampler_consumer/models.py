"""Base models for sampling: loaded once and wrapped for per-row LoRA (the engine core keeps a small LRU)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM

from bus_runtime.base_models import load_tokenizer, resolve_base_model
from sampler_consumer.lora import LoraBank

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    name: str
    model: Any  # a transformers *ForCausalLM, eval mode, LoRA-wrapped
    tokenizer: Any
    lora: LoraBank
    eos_ids: frozenset[int]
    vocab_size: int
    max_positions: int
    device: torch.device
    dtype: torch.dtype

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _as_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def load_base_model(name: str, device: torch.device, dtype: torch.dtype, *, adapter_slots: int = 16,
                    max_lora_rank: int = 32) -> BaseModel:
    path = resolve_base_model(name)
    log.info("loading base model %s from %s on %s (%s)", name, path, device, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    cast(torch.nn.Module, model).to(device).eval().requires_grad_(False)  # transformers' stub types `.to` oddly
    tokenizer = load_tokenizer(name)
    eos = _as_ids(model.config.eos_token_id) | _as_ids(getattr(model.generation_config, "eos_token_id", None))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    vocab = model.get_output_embeddings().weight.shape[0]
    return BaseModel(
        name=name, model=model, tokenizer=tokenizer, eos_ids=frozenset(eos),
        lora=LoraBank(model, device, dtype, slots=adapter_slots + 1, max_rank=max_lora_rank),
        vocab_size=vocab, max_positions=int(getattr(model.config, "max_position_embeddings", 1 << 20)),
        device=device, dtype=dtype,
    )
