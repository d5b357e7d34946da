"""Model shapes for benchmarks: random weights from a config, so nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    # Llama-3.2-1B and Llama-3.1-8B geometry (vocab 128256); tied embeddings for 1B as upstream.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}

# Per-shape default batch: the baseline shapes (8 x 2048 for 1B, 2 x 2048 for 8B).
DEFAULT_BATCH: dict[str, tuple[int, int]] = {
    "llama-1b": (8, 2048), "llama-8b": (2, 2048), "smollm2": (4, 256), "tiny": (4, 128)}


def build_model_dir(shape: str, directory: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Save a random-weight Llama of `shape` (plus a tiny tokenizer) where resolve_base_model finds it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bus_runtime.testing import make_tiny_model

    if (directory / "config.json").exists():
        return directory
    tok_dir = make_tiny_model(directory.parent / f"{directory.name}-tokenizer")
    cfg = LlamaConfig(max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (directory / f.name).write_bytes(f.read_bytes())
    meta = json.loads((directory / "config.json").read_text())
    meta["_bench_shape"] = shape
    (directory / "config.json").write_text(json.dumps(meta, indent=1))
    return directory
