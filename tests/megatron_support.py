"""Helpers for the Megatron backend tests: tiny HF models, per-loss datums, comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from bus_events import payloads as p
from bus_events.tensors import tensor_from_numpy

LOSSES = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
TOLERANCE = 1e-4  # fp32 on CPU; the parity bar


def make_tiny_qwen2(directory: Path, vocab_size: int = 255, num_heads: int = 4, num_kv_heads: int = 2) -> Path:
    """A tiny random Qwen2 with what Llama lacks: q/k/v biases (made non-zero), untied lm_head, and an odd
    vocabulary, which megatron pads to a multiple of the TP size."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    return directory


def loss_data(loss_fn: str, seed: int, vocab: int, lengths: Sequence[int] = (9, 5, 12)) -> list[p.Datum]:
    """Datums carrying every input `loss_fn` needs; weights are arbitrary reals (negative ones included)."""
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        sequence = rng.integers(0, vocab, n + 1)
        inputs = {"target_tokens": tensor_from_numpy(sequence[1:], "int64")}
        if loss_fn == "cross_entropy":
            inputs["weights"] = tensor_from_numpy(rng.uniform(-0.5, 1.5, n), "float32")
        else:
            # Sampler logprobs near the model's (about -log(vocab)), so PPO/CISPO ratios fall on both sides of clips.
            inputs["logprobs"] = tensor_from_numpy(-np.log(vocab) + rng.uniform(-0.4, 0.4, n), "float32")
            inputs["advantages"] = tensor_from_numpy(rng.standard_normal(n), "float32")
        data.append(p.Datum(tokens=tensor_from_numpy(sequence[:-1], "int32"), loss_fn_inputs=inputs))
    return data


def random_adapter(shapes: Mapping[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Non-zero A and B (a fresh adapter has B = 0, which would leave the LoRA path untested)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shapes[key].shape, generator=generator) * scale for key in sorted(shapes)}


def max_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a else 0.0


def max_logprob_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
