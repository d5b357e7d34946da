"""Activation checkpointing in both backends: the same gradients as without it, and fewer activation bytes kept
for backward. The bytes are counted with torch's saved-tensor hooks around forward_backward: a tensor saved inside
a (non-reentrant) checkpointed region is packed by the checkpoint's own hooks, not ours, so the count is exactly
what autograd keeps alive between forward and backward outside the recomputed regions."""

from __future__ import annotations

import pytest
import torch
from trainer_support import random_data

from bus_events.payloads import LoraSpec
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import HfPeftBackend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _backend(kind: str, checkpointing: bool):
    if kind == "hf":
        return HfPeftBackend(device="cpu", gradient_checkpointing=checkpointing)
    pytest.importorskip("megatron.core")
    from trainer_consumer.backends.megatron.backend import MegatronBackend

    return MegatronBackend(tp_size=1, gradient_checkpointing=checkpointing)


def _grads(backend, kind: str) -> dict[str, torch.Tensor]:
    if kind == "hf":
        params = backend._models.adapters["m"].params
    else:
        params = backend._engine._models.adapters["m"].local.params
    return {key: value.grad.detach().clone() for key, value in params.items()}


def _saved_bytes_and_grads(kind: str, checkpointing: bool, base: str) -> tuple[int, dict[str, torch.Tensor]]:
    backend = _backend(kind, checkpointing)
    backend.create_adapter("m", AdapterSpec(base_model=base, lora=LoraSpec(rank=4, seed=3)))
    data = random_data(5, 4, vocab=256, lengths=(40, 60))
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        backend.forward_backward("m", data, "cross_entropy", {}, False)
    return saved, _grads(backend, kind)


@pytest.mark.parametrize("kind", ["hf", "megatron"])
def test_checkpointing_keeps_gradients_and_drops_activation_memory(kind, tiny):
    plain_bytes, plain_grads = _saved_bytes_and_grads(kind, False, tiny)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(kind, True, tiny)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # Two decoder layers: without checkpointing every layer's attention and MLP intermediates are kept; with it
    # only each layer's input is. (The logprob chunks are checkpointed in both modes.)
    print(f"{kind}: saved activation bytes {plain_bytes} without, {ckpt_bytes} with checkpointing")
    assert ckpt_bytes < plain_bytes / 3, (kind, plain_bytes, ckpt_bytes)
