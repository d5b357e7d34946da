"""Helpers for the sampler tests: tiny models, PEFT adapters trained for a few steps, sample requests."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from artifact_store import Checkpoint, CheckpointStore, Registry, SamplingSession, TinkerPath
from bus_events import EventType, make_event, tensor_from_numpy
from bus_events import payloads as p
from bus_runtime.testing import make_tiny_model
from sampler_consumer.models import load_base_model
from sampler_consumer.service import SampleJob

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def train_peft_adapter(model_dir: Path, *, seed: int, rank: int = 4, alpha: int = 8, steps: int = 3,
                       targets: list[str] | None = None, **lora_kwargs) -> Checkpoint:
    """A PEFT LoRA adapter trained a few AdamW steps on random tokens (so lora_B is far from zero)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ALL_LINEAR, **lora_kwargs)
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    tokens = torch.randint(3, base.config.vocab_size, (2, 24))
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return Checkpoint(adapter_config=model.peft_config["default"].to_dict(),
                      adapter_weights={k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()})


def save_sampler_weights(ckpts: CheckpointStore, run: str, name: str, ckpt: Checkpoint, base_model: str,
                         overwrite: bool = False) -> str:
    path = TinkerPath(run, "sampler_weights", name)
    ckpts.save(path, ckpt, base_model=base_model, overwrite=overwrite)
    return str(path)


def add_session(registry: Registry, session_id: str, base_model: str, model_path: str | None,
                tenant: str = "default") -> str:
    registry.put_sampling_session(SamplingSession(session_id, base_model=base_model, tenant=tenant,
                                                  model_path=model_path))
    return session_id


def sample_request(session_id: str, prompt: list[int], **kwargs) -> p.Sample:
    params = kwargs.pop("params", None) or p.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    return p.Sample(sampling_session_id=session_id, prompt=tensor_from_numpy(np.asarray(prompt, dtype=np.int32)),
                    sampling_params=params, **kwargs)


def job(request: p.Sample, tenant: str = "default") -> SampleJob:
    env, payload = make_event(EventType.SAMPLE, request, model_id=request.sampling_session_id, tenant=tenant)
    return SampleJob(env, payload)


def sample_result(result: p.Result) -> p.SampleResult:
    assert result.error is None, result.error
    return msgspec.convert(result.result, p.SampleResult)


def sequences(result: p.Result) -> list[tuple[list[int], list[float], str]]:
    """(tokens, logprobs, stop_reason) of every sampled sequence of a successful result."""
    return [(s.tokens.numpy().tolist(), s.logprobs.numpy().tolist(), s.stop_reason)
            for s in sample_result(result).sequences]


# Fixtures of the engine-level tests (registered with `pytest_plugins = ["sampler_support"]`): a tiny random Llama
# and it loaded on the CPU in fp32, where sampled logprobs equal teacher forcing to 1e-5.
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_base_model(str(tiny_dir), torch.device("cpu"), torch.float32)
