"""The Megatron backend (TP=1, in-process) against the HF + PEFT backend on the same weights, fp32 on CPU."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron_support import (
    LOSSES,
    TOLERANCE,
    loss_data,
    make_tiny_qwen2,
    max_diff,
    max_logprob_diff,
    random_adapter,
)
from safetensors.torch import save_file

from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from bus_events.tensors import tensor_from_numpy
from bus_runtime.testing import make_tiny_model
from loss_plugins import LossInputError, UnknownLoss
from trainer_consumer.backends.base import AdapterSpec, BackendInputError, UnknownModel
from trainer_consumer.backends.hf_peft import HfPeftBackend
from trainer_consumer.backends.megatron.backend import MegatronBackend

pytest.importorskip("megatron.core")

# Adam's first step is lr·g/(|g| + eps): with a tiny eps it is sign(g)·lr, so gradient entries near zero, whose
# sign is fp32 noise between two matmul orders, would flip by 2·lr. eps = 1e-3 bounds the weight difference by
# lr·|Δg|/eps while gradients themselves are compared through grad_norm and the AdamW moments.
ADAM = p.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-3, weight_decay=0.01, grad_clip_norm=1.0)
_ids = itertools.count()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int]]:
    """name -> (base model path, vocab size): a tied-embedding Llama and a Qwen2 with qkv biases."""
    llama = make_tiny_model(tmp_path_factory.mktemp("llama") / "m")
    qwen2 = make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "m")
    return {"llama": (str(llama), 256), "qwen2": (str(qwen2), 255)}


@pytest.fixture(scope="module")
def hf() -> HfPeftBackend:
    return HfPeftBackend(device="cpu")


@pytest.fixture(scope="module")
def mg() -> MegatronBackend:
    return MegatronBackend(tp_size=1)


def twin_adapters(hf: HfPeftBackend, mg: MegatronBackend, spec: AdapterSpec, seed: int = 3) -> str:
    """The same random non-zero adapter in both backends; returns its model id."""
    model_id = f"m{next(_ids)}"
    hf.create_adapter(model_id, spec)
    mg.create_adapter(model_id, spec)
    weights = random_adapter(hf.export_adapter(model_id).weights, seed)
    hf.load_adapter(model_id, weights, None)
    mg.load_adapter(model_id, weights, None)
    return model_id


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_seed_gives_the_same_adapter_as_hf(hf, mg, bases, arch) -> None:
    spec = AdapterSpec(base_model=bases[arch][0], lora=LoraSpec(rank=4, seed=11))
    model_id = f"m{next(_ids)}"
    hf.create_adapter(model_id, spec)
    mg.create_adapter(model_id, spec)
    expected, got = hf.export_adapter(model_id), mg.export_adapter(model_id)
    assert max_diff(expected.weights, got.weights) == 0.0
    assert got.config == expected.config
    assert mg.base_model_info(spec.base_model) == hf.base_model_info(spec.base_model)


@pytest.mark.parametrize(("arch", "loss_fn"), [(a, loss) for a in ("llama", "qwen2") for loss in LOSSES])
def test_logprobs_and_one_training_step_match_hf(hf, mg, bases, arch, loss_fn) -> None:
    path, vocab = bases[arch]
    model_id = twin_adapters(hf, mg, AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=5)))
    data = loss_data(loss_fn, seed=1, vocab=vocab)

    expected = hf.forward_backward(model_id, data, loss_fn, {}, forward_only=False)
    got = mg.forward_backward(model_id, data, loss_fn, {}, forward_only=False)
    assert max_logprob_diff(expected.logprobs, got.logprobs) < TOLERANCE
    assert got.metrics.keys() == expected.metrics.keys()
    assert all(abs(got.metrics[k] - expected.metrics[k]) < TOLERANCE * max(1.0, abs(expected.metrics[k]))
               for k in expected.metrics)

    hf_step, mg_step = hf.optim_step(model_id, ADAM), mg.optim_step(model_id, ADAM)
    assert abs(mg_step["grad_norm"] - hf_step["grad_norm"]) < TOLERANCE * max(1.0, hf_step["grad_norm"])
    assert max_diff(hf.export_adapter(model_id).weights, mg.export_adapter(model_id).weights) < TOLERANCE
    assert max_diff(hf.export_optimizer(model_id), mg.export_optimizer(model_id)) < TOLERANCE

    after = hf.forward_backward(model_id, data, loss_fn, {}, forward_only=True)
    assert max_logprob_diff(after.logprobs, mg.forward_backward(model_id, data, loss_fn, {}, True).logprobs) < TOLERANCE
    assert max_logprob_diff(after.logprobs, expected.logprobs) > 1e-3  # the step changed the model


def test_micro_batches_and_accumulated_calls_match_one_hf_pass(hf, bases) -> None:
    """Requests split into micro-batches (two-pass path) and gradients summed over two forward_backward calls."""
    small = MegatronBackend(tp_size=1, micro_batch_tokens=16, logprob_chunk_tokens=5)
    path, vocab = bases["qwen2"]
    model_id = twin_adapters(hf, small, AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=5)))
    first, second = loss_data("ppo", seed=2, vocab=vocab), loss_data("ppo", seed=3, vocab=vocab, lengths=(7, 3))
    for data in (first, second):
        expected = hf.forward_backward(model_id, data, "ppo", {"clip_low_threshold": 0.9}, False)
        got = small.forward_backward(model_id, data, "ppo", {"clip_low_threshold": 0.9}, False)
        assert max_logprob_diff(expected.logprobs, got.logprobs) < TOLERANCE
    hf.optim_step(model_id, ADAM)
    small.optim_step(model_id, ADAM)
    assert max_diff(hf.export_adapter(model_id).weights, small.export_adapter(model_id).weights) < TOLERANCE


def test_gradient_checkpointing_matches_one_hf_pass(hf, bases) -> None:
    checkpointed = MegatronBackend(tp_size=1, gradient_checkpointing=True)
    path, vocab = bases["llama"]
    model_id = twin_adapters(hf, checkpointed, AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=6)))
    data = loss_data("cispo", seed=4, vocab=vocab)
    expected = hf.forward_backward(model_id, data, "cispo", {}, False)
    assert max_logprob_diff(expected.logprobs, checkpointed.forward_backward(model_id, data, "cispo", {}, False)
                            .logprobs) < TOLERANCE
    hf.optim_step(model_id, ADAM)
    checkpointed.optim_step(model_id, ADAM)
    assert max_diff(hf.export_adapter(model_id).weights, checkpointed.export_adapter(model_id).weights) < TOLERANCE
    layer_forward = checkpointed._engine._models.bases[path].model.decoder.layers[0].forward
    assert getattr(layer_forward, "func", None) is torch.utils.checkpoint.checkpoint  # recompute was really on


def test_exported_adapter_is_a_peft_adapter_with_the_same_logprobs(mg, bases, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, vocab = bases["llama"]
    model_id = f"m{next(_ids)}"
    mg.create_adapter(model_id, AdapterSpec(base_model=path,
                                            lora=LoraSpec(rank=8, seed=2, train_mlp=False, train_unembed=False)))
    mg.load_adapter(model_id, random_adapter(mg.export_adapter(model_id).weights, seed=4), None)
    data = loss_data("cross_entropy", seed=5, vocab=vocab)
    mg.forward_backward(model_id, data, "cross_entropy", {}, False)
    mg.optim_step(model_id, ADAM)
    exported = mg.export_adapter(model_id)
    assert all(".mlp." not in key and "lm_head" not in key for key in exported.weights)
    save_file(exported.weights, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(exported.config))

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tmp_path)
    got = mg.forward_backward(model_id, data, "cross_entropy", {}, forward_only=True).logprobs
    for datum, logprobs in zip(data, got, strict=True):
        tokens = torch.from_numpy(datum.tokens.numpy().astype(np.int64))[None]
        targets = torch.from_numpy(datum.loss_fn_inputs["target_tokens"].numpy())
        with torch.no_grad():
            expected = peft_model(input_ids=tokens).logits[0].log_softmax(-1).gather(-1, targets[:, None])[:, 0]
        assert np.abs(expected.numpy() - logprobs).max() < TOLERANCE


def test_checkpoints_move_between_backends(hf, mg, bases) -> None:
    """Adapter + AdamW moments exported by Megatron continue training in HF exactly as in Megatron."""
    path, vocab = bases["qwen2"]
    spec = AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=9))
    source = twin_adapters(hf, mg, spec)
    data = loss_data("cross_entropy", seed=6, vocab=vocab)
    mg.forward_backward(source, data, "cross_entropy", {}, False)
    mg.optim_step(source, ADAM)
    target = f"m{next(_ids)}"
    hf.create_adapter(target, spec)
    hf.load_adapter(target, mg.export_adapter(source).weights, mg.export_optimizer(source))
    for backend, model_id in ((hf, target), (mg, source)):
        backend.forward_backward(model_id, data, "cross_entropy", {}, False)
        backend.optim_step(model_id, ADAM)
    assert max_diff(hf.export_adapter(target).weights, mg.export_adapter(source).weights) < TOLERANCE
    assert max_diff(hf.export_optimizer(target), mg.export_optimizer(source)) < TOLERANCE


def test_adapters_on_one_base_do_not_interfere(mg, bases) -> None:
    path, vocab = bases["llama"]
    trained, bystander = f"m{next(_ids)}", f"m{next(_ids)}"
    for model_id, seed in ((trained, 1), (bystander, 2)):
        mg.create_adapter(model_id, AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=seed)))
        mg.load_adapter(model_id, random_adapter(mg.export_adapter(model_id).weights, seed), None)
    data = loss_data("cross_entropy", seed=7, vocab=vocab)
    before = mg.export_adapter(bystander).weights
    logprobs_before = mg.forward_backward(bystander, data, "cross_entropy", {}, True).logprobs
    mg.forward_backward(trained, data, "cross_entropy", {}, False)
    mg.optim_step(trained, ADAM)
    assert max_diff(before, mg.export_adapter(bystander).weights) == 0.0
    logprobs_after = mg.forward_backward(bystander, data, "cross_entropy", {}, True).logprobs
    assert max_logprob_diff(logprobs_before, logprobs_after) == 0
    assert mg.export_optimizer(bystander) == {}
    mg.remove_adapter(trained)
    with pytest.raises(UnknownModel):
        mg.forward_backward(trained, data, "cross_entropy", {}, True)


def test_bad_requests_fail_with_named_errors(mg, bases) -> None:
    path, vocab = bases["llama"]
    model_id = f"m{next(_ids)}"
    mg.create_adapter(model_id, AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=1)))
    data = loss_data("cross_entropy", seed=8, vocab=vocab)
    out_of_vocab = [p.Datum(tokens=tensor_from_numpy(np.array([1, vocab + 3]), "int32"),
                            loss_fn_inputs={"target_tokens": tensor_from_numpy(np.array([2, 3]), "int64")})]
    with pytest.raises(BackendInputError, match=r"data\[0\].tokens holds token id 259"):
        mg.forward_backward(model_id, out_of_vocab, "cross_entropy", {}, False)
    with pytest.raises(UnknownLoss):
        mg.forward_backward(model_id, data, "no_such_loss", {}, False)
    with pytest.raises(LossInputError, match=r"requires loss_fn_inputs\[.logprobs.\]"):
        mg.forward_backward(model_id, data, "importance_sampling", {}, False)
    weights = mg.export_adapter(model_id).weights
    key = next(iter(weights))
    with pytest.raises(BackendInputError, match="has shape"):
        mg.load_adapter(model_id, {**weights, key: torch.zeros(3, 3)}, None)
    with pytest.raises(BackendInputError, match="unexpected"):
        mg.load_adapter(model_id, {**weights, "base_model.model.extra.lora_A.weight": torch.zeros(1)}, None)
