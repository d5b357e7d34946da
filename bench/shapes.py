"""Model shapes for benchmarks: random weights from a config, so nothing is downloaded.

Parameter counts (`param_count`) and bf16 weight bytes of the Llama shapes, and their share per GPU under tensor
parallelism (every matrix and the vocabulary split N ways; the norms, 0.1 % or less, are replicated):

    shape       params    bf16 weights   TP=2       TP=4       TP=8
    llama-8b    8.03 B    14.96 GiB      7.5 GiB    3.7 GiB    1.9 GiB
    llama-70b   70.55 B   131.4 GiB      65.7 GiB   32.9 GiB   16.4 GiB

llama-70b is Llama-3.3-70B-Instruct's geometry (80 layers, hidden 8192, 64 query / 8 key-value heads, FFN 28672,
vocabulary 128256, untied lm_head); like llama-8b it leaves out the llama3 RoPE scaling, which changes no shape
or FLOP. HF's initialiser would build it in fp32 (282 GB) before casting, more than one GPU holds, so shapes
above STREAM_ABOVE_PARAMS are written tensor by tensor instead (`_write_streamed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict] = {
    # Llama-3.2-1B and Llama-3.1-8B geometry (vocab 128256); tied embeddings for 1B as upstream.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}

# Per-shape default batch: the baseline shapes (8 x 2048 for 1B, 2 x 2048 for 8B and 70B).
DEFAULT_BATCH: dict[str, tuple[int, int]] = {
    "llama-1b": (8, 2048), "llama-8b": (2, 2048), "llama-70b": (2, 2048), "smollm2": (4, 256), "tiny": (4, 128)}

STREAM_ABOVE_PARAMS = 20e9
SHARD_BYTES = 4 << 30  # safetensors file size of a streamed checkpoint


def linear_params(shape: dict[str, Any]) -> int:
    """Weights of one decoder layer's seven projections (q, k, v, o, gate, up, down)."""
    hidden, ffn = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    return 2 * hidden * q + 2 * hidden * kv + 3 * hidden * ffn


def param_count(shape: dict[str, Any]) -> int:
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    norms = (2 * shape["num_hidden_layers"] + 1) * hidden
    embeddings = vocab * hidden * (1 if shape["tie_word_embeddings"] else 2)
    return shape["num_hidden_layers"] * linear_params(shape) + embeddings + norms


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
    if param_count(SHAPES[shape]) > STREAM_ABOVE_PARAMS:
        _write_streamed(cfg, directory, getattr(torch, dtype), seed)
    else:
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


def _write_streamed(cfg: Any, directory: Path, dtype: Any, seed: int) -> None:
    """A sharded HF checkpoint (model-NNNNN.safetensors + index) with HF's init distribution (normal, std
    initializer_range; norms 1), drawn one tensor at a time: never more than one shard in host memory.
    config.json is written last, so an interrupted run leaves no folder that looks complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        names = {name: tuple(t.shape) for name, t in LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        filename = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        shard.clear()

    for name, shape in names.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = torch.empty(shape, device=device).normal_(0.0, cfg.initializer_range, generator=generator)
            tensor = tensor.to(dtype).cpu()
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        total += tensor.nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(directory)
