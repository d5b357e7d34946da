"""Real weights: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings) in Megatron vs HF + PEFT."""

from __future__ import annotations

import pytest
from megatron_support import TOLERANCE, loss_data, max_diff, max_logprob_diff, random_adapter

from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from bus_runtime.base_models import DEFAULT_BASE_MODEL, resolve_base_model
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import HfPeftBackend
from trainer_consumer.backends.megatron.backend import MegatronBackend

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

ADAM = p.AdamParams(learning_rate=1e-3, eps=1e-3)  # eps = 1e-3: see the ADAM comment in test_megatron_backend.py


def test_smollm2_logprobs_and_one_step_match_hf() -> None:
    path = str(resolve_base_model(DEFAULT_BASE_MODEL))
    hf, mg = HfPeftBackend(device="cpu"), MegatronBackend(tp_size=1)
    spec = AdapterSpec(base_model=path, lora=LoraSpec(rank=8, seed=1))
    for backend in (hf, mg):
        backend.create_adapter("smol", spec)
    weights = random_adapter(hf.export_adapter("smol").weights, seed=2, scale=0.02)
    data = loss_data("importance_sampling", seed=3, vocab=mg.base_model_info(path).vocab_size, lengths=(24, 11))
    results = []
    for backend in (hf, mg):
        backend.load_adapter("smol", weights, None)
        results.append(backend.forward_backward("smol", data, "importance_sampling", {}, forward_only=False))
        backend.optim_step("smol", ADAM)
    assert max_logprob_diff(results[0].logprobs, results[1].logprobs) < TOLERANCE
    assert abs(results[0].metrics["loss:sum"] - results[1].metrics["loss:sum"]) < TOLERANCE
    assert max_diff(hf.export_adapter("smol").weights, mg.export_adapter("smol").weights) < TOLERANCE
