"""Training backends behind the TrainingBackend protocol (base.py). `make_backend` picks one by name."""

from __future__ import annotations

from trainer_consumer.backends.base import TrainingBackend
from trainer_consumer.config import TrainerConfig


def make_backend(config: TrainerConfig, device: str = "auto") -> TrainingBackend:
    """The configured backend with every setting it takes. Megatron takes no `deterministic` / `torch_compile` (it
    runs eagerly) and places itself on the GPUs of its tensor-parallel ranks, so those and `device` are the HF
    backend's alone."""
    if config.backend == "hf_peft":
        from trainer_consumer.backends.hf_peft import HfPeftBackend

        return HfPeftBackend(device=device, gradient_checkpointing=config.gradient_checkpointing,
                             logprob_chunk_tokens=config.logprob_chunk_tokens,
                             micro_batch_tokens=config.micro_batch_tokens, deterministic=config.deterministic,
                             torch_compile=config.torch_compile)
    if config.backend == "megatron":
        from trainer_consumer.backends.megatron.backend import MegatronBackend

        return MegatronBackend(tp_size=config.megatron_tp_size, logprob_chunk_tokens=config.logprob_chunk_tokens,
                               micro_batch_tokens=config.micro_batch_tokens,
                               gradient_checkpointing=config.gradient_checkpointing)
    raise ValueError(f"unknown trainer backend {config.backend!r}; known: ['hf_peft', 'megatron']")
