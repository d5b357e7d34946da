"""HF <-> megatron-core weights for Llama / Qwen2 (mapping verified on SmolLM2, offline-models.md section 7).

Loading reads the safetensors files lazily, one tensor at a time, so a rank never holds the whole HF checkpoint
on top of its own shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trainer_consumer.backends.megatron.config import ModelShape
from trainer_consumer.backends.megatron.layout import all_linears
from trainer_consumer.backends.megatron.parallel import gather, shard, tp_size

TensorSource = Callable[[str], torch.Tensor]  # HF parameter name -> full tensor


def _replicated_names(shape: ModelShape) -> dict[str, str]:
    """megatron name -> HF name for the norms, which every TP rank holds whole."""
    names = {"decoder.final_layernorm.weight": "model.norm.weight"}
    for i in range(shape.num_layers):
        names[f"decoder.layers.{i}.input_layernorm.weight"] = f"model.layers.{i}.input_layernorm.weight"
        names[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
    return names


def hf_to_megatron(source: TensorSource, shape: ModelShape, rank: int, size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, this rank's tensor) for every base weight, read from HF-named full tensors."""
    yield "embedding.word_embeddings.weight", shard(source("model.embed_tokens.weight"), 0, rank, size)
    for mc_name, hf_name in _replicated_names(shape).items():
        yield mc_name, source(hf_name)
    for linear in all_linears(shape):
        if linear.megatron_module == "output_layer" and shape.tied_embeddings:
            continue
        yield f"{linear.megatron_module}.weight", linear.fuse(
            [source(f"{part.hf_module}.weight") for part in linear.parts], rank, size)
        if shape.qkv_bias and linear.megatron_module.endswith("linear_qkv"):
            yield f"{linear.megatron_module}.bias", linear.fuse(
                [source(f"{part.hf_module}.bias") for part in linear.parts], rank, size)


def megatron_to_hf(model: torch.nn.Module, shape: ModelShape) -> dict[str, torch.Tensor]:
    """The full HF state dict of a (possibly TP-sharded) model; every TP rank must call it (it all-gathers)."""
    size = tp_size()
    local = {name: tensor.detach() for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}
    out = {"model.embed_tokens.weight": gather(local["embedding.word_embeddings.weight"], 0, shape.vocab_size)}
    for mc_name, hf_name in _replicated_names(shape).items():
        out[hf_name] = local[mc_name].clone()
    for linear in all_linears(shape):
        if linear.megatron_module == "output_layer" and shape.tied_embeddings:
            continue
        suffixes = ["weight"] + (["bias"] if f"{linear.megatron_module}.bias" in local else [])
        for suffix in suffixes:
            fused = local[f"{linear.megatron_module}.{suffix}"]
            if linear.kind == "row":
                (part,) = linear.parts
                out[f"{part.hf_module}.{suffix}"] = gather(fused, 1, part.in_features)
                continue
            for part, piece in zip(linear.parts, linear.split(fused, size), strict=True):
                out[f"{part.hf_module}.{suffix}"] = gather(piece, 0, part.out_features)
    return out


@contextmanager
def safetensors_source(folder: Path) -> Iterator[TensorSource]:
    """A TensorSource over an HF folder's model.safetensors or its sharded index."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        file_of = json.loads(index_file.read_text())["weight_map"]
    else:
        single = "model.safetensors"
        if not (folder / single).is_file():
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        with safe_open(folder / single, framework="pt") as handle:
            file_of = dict.fromkeys(handle.keys(), single)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}  # file name -> open safetensors handle

        def read(name: str) -> torch.Tensor:
            if name not in file_of:
                raise KeyError(f"{folder} has no tensor {name!r}")
            filename = file_of[name]
            if filename not in handles:
                handles[filename] = stack.enter_context(safe_open(folder / filename, framework="pt"))
            return handles[filename].get_tensor(name)

        yield read


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, source: TensorSource, shape: ModelShape, rank: int, size: int) -> None:
    """Copy HF weights into the model's parameters (cast to their dtype/device); every parameter must be set."""
    params = dict(model.named_parameters())
    unset = set(params)
    for name, tensor in hf_to_megatron(source, shape, rank, size):
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: megatron expects {list(param.shape)}, conversion produced {list(tensor.shape)}")
        param.copy_(tensor)
        unset.discard(name)
    if unset:
        raise ValueError(f"HF checkpoint left megatron parameters unset: {sorted(unset)}")
