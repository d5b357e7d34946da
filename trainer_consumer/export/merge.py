"""Fold a PEFT LoRA adapter into its base model: W' = W + s·B·A per adapted module, written as safetensors shards
next to the base's config and tokenizer, so plain `AutoModelForCausalLM.from_pretrained(out)` gives the logits of
base + adapter.

- Scaling s as PEFT applies it: lora_alpha / r, or lora_alpha / √r with use_rslora; rank_pattern / alpha_pattern
  entries override r / alpha for the modules whose name ends with their key.
- Embedding LoRA (PEFT's lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]): ΔE = (B·A)ᵀ·s.
- Tied embeddings: with LoRA on lm_head or on the input embedding, base + adapter no longer has one matrix for
  both (PEFT adapts the two modules separately), so the output is UNTIED: lm_head.weight written explicitly and
  tie_word_embeddings = false.
- One base shard in memory at a time; the delta is computed in fp32 and the sum cast to the output dtype.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PEFT_PREFIX = "base_model.model."
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
# PEFT's save_embedding_layers="auto" also stores the full base weight of adapted embedding layers. Equal to the
# base model's, it is redundant; different (a vocabulary resized for training), PEFT's own loading of it on tied
# embeddings is ambiguous, so the merge refuses it rather than guess.
_BASE_LAYER = ".base_layer.weight"
INDEX = "model.safetensors.index.json"
# Base-folder files that are weights or the config (rewritten); everything else (tokenizer, generation config,
# chat template) is copied as is.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")

# (what, done, total): "tensors" while shards are merged.
Progress = Callable[[str, int, int], None]


class MergeError(ValueError):
    """The adapter cannot be merged into this base (unknown key, shape mismatch, unsupported LoRA variant)."""


@dataclass
class _Lora:
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    embedding: bool = False
    base: torch.Tensor | None = None  # a saved base_layer weight, which must equal the base model's


def _pattern_value(module: str, pattern: Mapping[str, Any] | None, default: float) -> float:
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key):
            return float(value)
    return default


def scaling(config: Mapping[str, Any], module: str) -> float:
    """PEFT's scaling of `module`'s LoRA update, as adapter_config.json records it."""
    rank = _pattern_value(module, config.get("rank_pattern"), float(config["r"]))
    alpha = _pattern_value(module, config.get("alpha_pattern"), float(config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def parse_adapter(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> dict[str, _Lora]:
    """Module path (base-model naming, e.g. model.layers.0.self_attn.q_proj) -> its A and B."""
    if config.get("use_dora"):
        raise MergeError("adapter_config use_dora: DoRA adapters are not supported by the merge")
    if config.get("bias", "none") != "none":
        raise MergeError(f"adapter_config bias {config.get('bias')!r}: only bias 'none' adapters can be merged")
    loras: dict[str, _Lora] = {}
    for key, tensor in weights.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if name.endswith(_BASE_LAYER):
            loras.setdefault(name[:-len(_BASE_LAYER)], _Lora()).base = tensor
            continue
        for suffixes, embedding in ((_LINEAR, False), (_EMBEDDING, True)):
            side = next((i for i, suffix in enumerate(suffixes) if name.endswith(suffix)), None)
            if side is not None:
                lora = loras.setdefault(name[:-len(suffixes[side])], _Lora())
                lora.embedding = embedding
                setattr(lora, "ab"[side], tensor)
                break
        else:
            raise MergeError(f"adapter weight {key!r} is not a LoRA A/B matrix; cannot merge it")
    for module, lora in loras.items():
        if (lora.a is None) != (lora.b is None):
            raise MergeError(f"adapter module {module!r} has only one of its LoRA matrices (A and B are needed)")
        if lora.a is not None and lora.b is not None and lora.a.shape[0] != lora.b.shape[1]:
            raise MergeError(f"adapter module {module!r}: lora_A {list(lora.a.shape)} and lora_B "
                             f"{list(lora.b.shape)} disagree on the rank")
    return loras


def delta(lora: _Lora, scale: float) -> torch.Tensor:
    """The fp32 update of the module's weight, in the weight's own layout (zero without A and B)."""
    if lora.a is None or lora.b is None:
        return torch.zeros(())
    product = lora.b.float() @ lora.a.float()
    return (product.T if lora.embedding else product) * scale


def _tied_names(base_dir: Path) -> tuple[bool, str, str, dict[str, Any]]:
    """(tied?, input-embedding module, output-embedding module, config.json) of the base, from the model's own
    class instantiated on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    names = {id(module): name for name, module in model.named_modules()}
    embed, head = names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())]
    tied = bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", False))
    return tied, embed, head, json.loads((base_dir / "config.json").read_text())


def _shards(base_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    index_path = base_dir / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base_dir / "model.safetensors").exists():
        return ["model.safetensors"], None
    raise MergeError(f"base model folder {base_dir} holds no safetensors weights (model.safetensors or {INDEX})")


def merge_lora(base_dir: Path, adapter_config: Mapping[str, Any], adapter_weights: Mapping[str, torch.Tensor],
               out: Path, *, dtype: torch.dtype | None = None, progress: Progress | None = None) -> Path:
    """Write base + adapter merged into `out` (created; must not hold a config.json yet); returns `out`.
    `dtype`: the output weights' dtype, default the base's own per tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_dir, out = Path(base_dir), Path(out)
    if (out / "config.json").exists():
        raise MergeError(f"output folder {out} already holds a model (config.json); choose an empty folder")
    loras = parse_adapter(adapter_config, adapter_weights)
    tied, embed, head, config = _tied_names(base_dir)
    untie = tied and (embed in loras or head in loras)
    shards, index = _shards(base_dir)
    total = 0
    for shard in shards:
        with safe_open(str(base_dir / shard), framework="pt") as handle:
            total += len(list(handle.keys()))
    out.mkdir(parents=True, exist_ok=True)
    done, pending = 0, dict(loras)
    weight_map: dict[str, str] = {}
    for shard in shards:
        tensors = load_file(str(base_dir / shard))
        if untie and f"{embed}.weight" in tensors and f"{head}.weight" not in tensors:
            tensors[f"{head}.weight"] = tensors[f"{embed}.weight"]  # the tied matrix, before the embedding's delta
        merged = {}
        for name, weight in tensors.items():
            module = name.removesuffix(".weight")
            lora = pending.pop(module, None) if name.endswith(".weight") else None
            target = dtype or weight.dtype
            if lora is None:
                merged[name] = weight.to(target).contiguous()
            else:
                if lora.base is not None and not torch.equal(lora.base.to(weight.dtype), weight):
                    raise MergeError(f"adapter module {module!r} carries a base_layer weight that differs from the "
                                     f"base model's {name!r}; adapters with a resized vocabulary are not supported")
                update = delta(lora, scaling(adapter_config, module))
                if update.dim() and update.shape != weight.shape:
                    raise MergeError(f"adapter module {module!r} updates shape {list(update.shape)} but the base "
                                     f"weight {name!r} has shape {list(weight.shape)}")
                merged[name] = (weight.float() + update).to(target).contiguous()
            weight_map[name] = shard
            done += 1
            if progress is not None:
                progress("tensors", min(done, total), total)
        save_file(merged, str(out / shard), metadata={"format": "pt"})
        del tensors, merged
    if pending:
        raise MergeError(f"adapter modules {sorted(pending)[:3]} have no weight in base model {base_dir}")
    if index is not None:
        (out / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    if dtype is not None:  # transformers 5 writes "dtype", older versions "torch_dtype"
        config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for item in base_dir.iterdir():
        if item.is_file() and item.name not in ("config.json", INDEX) and not item.name.endswith(_NOT_COPIED):
            shutil.copy2(item, out / item.name)
    return out
