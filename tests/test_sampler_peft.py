"""Acceptance: sampler weights written through CheckpointStore load into plain transformers + PEFT
(`PeftModel.from_pretrained` on the downloaded folder) and give the sampler's logprobs (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from peft import PeftModel
from sampler_support import add_session, job, sample_request, sample_result, save_sampler_weights, train_peft_adapter
from transformers import AutoModelForCausalLM

from artifact_store import CheckpointStore, Registry, TinkerPath
from bus_events import payloads as p
from bus_runtime.testing import make_tiny_model
from sampler_consumer.config import SamplerConfig
from sampler_consumer.service import SamplerService

PROMPT = [5, 17, 42, 99, 7, 133, 250, 12, 64, 3, 201, 88]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _teacher_forced(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t >= 1."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.mark.parametrize("lora_kwargs", [
    {},
    {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
], ids=["plain", "rslora-patterns"])
def test_store_written_adapter_loads_in_peft_and_matches_sampler_logprobs(settings, store, tiny_dir, tmp_path,
                                                                           lora_kwargs):
    base_model = str(tiny_dir)
    ckpts = CheckpointStore(store)
    path = save_sampler_weights(ckpts, "run:train:0", "step-3", train_peft_adapter(tiny_dir, seed=1, **lora_kwargs),
                                base_model)
    folder = ckpts.download(TinkerPath.parse(path), tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                           folder).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expected = _teacher_forced(peft_model, PROMPT).numpy()
    assert np.abs(expected - _teacher_forced(base, PROMPT).numpy()).max() > 1e-2  # the adapter matters

    add_session(Registry(store), "s:sample:0", base_model, path)
    service = SamplerService(dataclasses.replace(settings, device="cpu"), SamplerConfig(), store)
    # compute_logprobs: prompt_logprobs with max_tokens=1 (tinker-protocol.md 2.3)
    compute = sample_request("s:sample:0", PROMPT, prompt_logprobs=True,
                             params=p.SamplingParams(max_tokens=1, temperature=1.0))
    greedy = sample_request("s:sample:0", PROMPT, params=p.SamplingParams(max_tokens=10, temperature=0.0, stop=[]))
    try:
        (_, computed), (_, sampled) = service.run_batch([job(compute), job(greedy)])
    finally:
        service.close()

    got = sample_result(computed).prompt_logprobs.numpy()
    assert got.shape == (len(PROMPT),) and math.isnan(got[0])
    np.testing.assert_allclose(got[1:], expected, atol=1e-5, rtol=0)

    # Sampled tokens: PEFT's own greedy generate, and per-token logprobs equal to PEFT teacher forcing.
    [sequence] = sample_result(sampled).sequences
    tokens = sequence.tokens.numpy().tolist()
    with torch.no_grad():
        reference = peft_model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=10, min_new_tokens=10,
                                        do_sample=False)[0, len(PROMPT):].tolist()
    assert tokens == reference
    np.testing.assert_allclose(sequence.logprobs.numpy(), _teacher_forced(peft_model, PROMPT + tokens)[-10:].numpy(),
                               atol=1e-5, rtol=0)
