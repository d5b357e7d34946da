"""The training fast paths (backends/logprobs.py, backends/lora_compute.py) against the plain computations."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trainer_support import adapter_grads, random_data

from bus_events.payloads import LoraSpec
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import HfPeftBackend
from trainer_consumer.backends.logprobs import frozen_unembed_logprobs
from trainer_consumer.backends.lora_compute import FusedLoraLinear, adopt, frozen_weight, use


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _full_logprobs(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_frozen_unembed_logprobs_match_a_full_log_softmax_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    upstream = torch.randn(13)  # a loss that weighs positions differently, as RL losses do
    full = _full_logprobs(weight, hidden, targets)
    (grad_full,) = torch.autograd.grad((full * upstream).sum(), hidden)
    fused = frozen_unembed_logprobs(weight, hidden, targets, chunk)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), hidden)
    torch.testing.assert_close(fused, full)
    torch.testing.assert_close(grad_fused, grad_full)
    with torch.no_grad():
        torch.testing.assert_close(frozen_unembed_logprobs(weight, hidden, targets, chunk), full.detach())


def test_frozen_unembed_logprobs_refuse_a_trainable_unembedding():
    with pytest.raises(ValueError, match="frozen"):
        frozen_unembed_logprobs(torch.randn(5, 3, requires_grad=True), torch.randn(2, 3), torch.tensor([0, 1]), 4)


def test_fused_lora_linear_matches_peft_in_output_and_gradients(tiny):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), config, adapter_name="one")
    reference.add_adapter("two", LoraConfig(r=2, lora_alpha=3, target_modules=["k_proj", "up_proj"]))
    for name, param in reference.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide a wrong B path
            torch.nn.init.normal_(param)
    fused = copy.deepcopy(reference)
    layers = adopt(fused)
    assert len(layers) == 2 * 5 + 1 and all(type(layer) is FusedLoraLinear for layer in layers)
    ids = torch.randint(0, 200, (2, 7))
    for adapter in ("one", "two"):
        for model in (reference, fused):
            model.set_adapter(adapter)
            model.zero_grad(set_to_none=True)
        use(layers, adapter)
        outputs = [model(input_ids=ids).logits for model in (reference, fused)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        for logits in outputs:
            logits.log_softmax(-1)[..., 3].sum().backward()
        grads = [{n: q.grad for n, q in model.named_parameters() if q.grad is not None} for model in (reference, fused)]
        assert grads[0].keys() == grads[1].keys() and grads[0] and all(f".{adapter}." in n for n in grads[0])
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    use(layers, None)
    assert frozen_weight(fused.get_output_embeddings()) is fused.get_output_embeddings().base_layer.weight
    use(layers, "one")
    assert frozen_weight(fused.get_output_embeddings()) is None


def test_an_adapter_without_lm_head_lora_gets_the_same_results_next_to_one_with_it(tiny):
    """Once any adapter wraps lm_head, the others must still see the plain head (and take the frozen path)."""
    alone, mixed = HfPeftBackend(), HfPeftBackend()
    plain = AdapterSpec(base_model=tiny, lora=LoraSpec(rank=4, seed=3, train_unembed=False))
    alone.create_adapter("m", plain)
    mixed.create_adapter("m", plain)
    mixed.create_adapter("with-head", AdapterSpec(base_model=tiny, lora=LoraSpec(rank=4, seed=5, train_unembed=True)))
    data = random_data(4, 3)
    mixed.forward_backward("with-head", data, "cross_entropy", {}, False)
    outputs = [backend.forward_backward("m", data, "cross_entropy", {}, False) for backend in (alone, mixed)]
    assert outputs[0].metrics["loss:sum"] == pytest.approx(outputs[1].metrics["loss:sum"], rel=1e-6)
    grads = adapter_grads(alone, "m"), adapter_grads(mixed, "m")
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-7)


def test_compiled_backend_matches_eager_and_compiles_once_for_all_adapters_and_shapes(tiny):
    from torch._dynamo.utils import counters

    eager, compiled = HfPeftBackend(torch_compile=False), HfPeftBackend(torch_compile=True)
    for backend in (eager, compiled):
        for seed in (3, 4):
            backend.create_adapter(f"m{seed}", AdapterSpec(base_model=tiny, lora=LoraSpec(rank=4, seed=seed)))
    graphs_after_first_step = None
    for step, (model_id, data) in enumerate([("m3", random_data(1, 3)), ("m4", random_data(2, 5, lengths=(3, 20))),
                                             ("m3", random_data(3, 2, lengths=(2, 30)))]):
        outputs = [backend.forward_backward(model_id, data, "cross_entropy", {}, False)
                   for backend in (eager, compiled)]
        assert outputs[1].metrics["loss:sum"] == pytest.approx(outputs[0].metrics["loss:sum"], rel=1e-5)
        grads = adapter_grads(eager, model_id), adapter_grads(compiled, model_id)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for key in grads[0]:
            torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6)
        for backend in (eager, compiled):
            backend.discard_gradients(model_id)
        if step == 0:
            graphs_after_first_step = counters["stats"]["unique_graphs"]
    # Batches of one datum would add one pair of graphs: dynamo specialises sizes 0 and 1.
    assert counters["stats"]["unique_graphs"] == graphs_after_first_step  # no recompiles per adapter or shape
