"""CUDA graphs of the decoder for small no-grad calls (backends/decoder_graphs.py): which calls get one, that the
explicit causal mask they run with is the decoder's own, and on a GPU that a graphed forward gives the very logprobs
of the uncaptured compiled decoder it replaces while training moves the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bus_events.payloads import AdamParams, LoraSpec
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.decoder_graphs import DecoderGraphs, GraphPlan, _Captured
from trainer_consumer.backends.hf_peft import HfPeftBackend, causal_mask, full_attention


def _captured() -> _Captured:
    return _Captured(graph=None, input_ids=torch.zeros(1, 1), hidden=torch.zeros(1), pointers=())


def test_a_key_is_captured_on_its_second_call_and_only_when_small():
    plan = GraphPlan(max_tokens=16, capture_on=2)
    assert plan.fits(("a", 1, 8)) and plan.fits(("a", 2, 8))
    assert not plan.fits(("a", 2, 9))  # 18 tokens > 16: never
    assert not plan.wants(("a", 1, 8))
    assert plan.wants(("a", 1, 8))
    assert not plan.wants(("b", 1, 8))  # counted per adapter slot


def test_the_least_recently_used_graph_goes_first():
    plan = GraphPlan(max_graphs=2)
    for key in [("a", 1, 1), ("a", 1, 2)]:
        plan.keep(key, _captured())
    assert plan.lookup(("a", 1, 1)) is not None  # now the most recent
    plan.keep(("a", 1, 3), _captured())
    assert list(plan.graphs) == [("a", 1, 1), ("a", 1, 3)]


def test_a_full_plan_lets_a_newcomer_displace_a_graph_only_once_called_more_than_it_was_replayed():
    plan = GraphPlan(max_graphs=1, capture_on=2)
    plan.keep(("a", 1, 1), _captured())
    for _ in range(3):
        assert plan.lookup(("a", 1, 1)) is not None  # 3 replays
    assert [plan.wants(("a", 1, 2)) for _ in range(4)] == [False, False, False, True]  # the 4th call: 4 > 3


def test_forgetting_a_slot_drops_its_graphs_and_counts_only():
    plan = GraphPlan(capture_on=2)
    plan.keep(("a", 1, 1), _captured())
    plan.keep(("b", 1, 1), _captured())
    plan.wants(("a", 1, 2))
    plan.forget("a")
    assert list(plan.graphs) == [("b", 1, 1)]
    assert not plan.wants(("a", 1, 2))  # its count started over


def test_disabled_plans_capture_nothing_and_keep_nothing():
    plan = GraphPlan(capture_on=1)
    plan.keep(("a", 1, 1), _captured())
    plan.disable("test")
    assert not plan.graphs and not plan.fits(("a", 1, 1)) and not plan.enabled


def test_bad_limits_are_refused_by_name():
    with pytest.raises(ValueError, match="max_tokens"):
        GraphPlan(max_tokens=0)


def test_calls_with_autograd_never_use_a_graph():
    graphs = DecoderGraphs(GraphPlan(capture_on=1))
    with torch.enable_grad():
        assert graphs.run("a", torch.zeros(1, 4, dtype=torch.int64), [], lambda ids: ids) is None
    assert not graphs.plan.graphs


def test_small_calls_run_the_given_decoder_before_their_capture_and_big_ones_never():
    graphs = DecoderGraphs(GraphPlan(max_tokens=8, capture_on=5))
    ids = torch.arange(8)[None]
    with torch.no_grad():
        assert torch.equal(graphs.run("a", ids, [], lambda x: x * 2), ids * 2)
        assert graphs.run("a", torch.zeros(1, 9, dtype=torch.int64), [], lambda x: x * 2) is None


def test_the_explicit_causal_mask_gives_the_decoders_own_hidden_states(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "tiny", num_layers=2)).eval()
    decoder = model.get_decoder()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decoder(input_ids=ids, use_cache=False).last_hidden_state
        masked = decoder(input_ids=ids, attention_mask=causal_mask(ids), use_cache=False).last_hidden_state
        future = causal_mask(ids).clone()
        future[..., 0, 1] = True  # position 0 sees position 1: must change position 0
        leaked = decoder(input_ids=ids, attention_mask=future, use_cache=False).last_hidden_state
    assert torch.equal(plain, masked)
    assert not torch.allclose(plain[:, 0], leaked[:, 0])


def test_sliding_windows_shorter_than_a_graphed_call_keep_the_ordinary_path():
    from transformers import LlamaConfig, Qwen2Config

    assert full_attention(LlamaConfig(), 256)
    assert full_attention(Qwen2Config(sliding_window=64, use_sliding_window=False), 256)
    assert not full_attention(Qwen2Config(sliding_window=64, use_sliding_window=True), 256)
    assert full_attention(Qwen2Config(sliding_window=4096, use_sliding_window=True), 256)


def test_cpu_backends_have_no_graphs(tmp_path):
    backend = HfPeftBackend(device="cpu", torch_compile=False)
    assert backend.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_forwards_give_the_uncaptured_compiled_decoders_logprobs_bit_for_bit(tmp_path):
    from bench.data import datums_from_tokens

    model = str(make_tiny_model(tmp_path / "tiny", num_layers=3))
    backend = HfPeftBackend(device="cuda", torch_compile=True)
    for i in range(2):
        backend.create_adapter(f"m{i}", AdapterSpec(model, LoraSpec(rank=4, seed=i, train_unembed=False)))
    small = datums_from_tokens(np.arange(3, 12)[None])
    train = datums_from_tokens(np.random.default_rng(0).integers(3, 200, (2, 33)))
    graphs = backend.graphs
    assert graphs is not None
    uncaptured = DecoderGraphs(GraphPlan(capture_on=10**9))  # the same masked, compiled decoder, never captured

    def forward(model_id: str, run_with: DecoderGraphs | None) -> list[np.ndarray]:
        backend.graphs = run_with
        try:
            return backend.forward_backward(model_id, small, "cross_entropy", {}, True).logprobs
        finally:
            backend.graphs = graphs

    before = forward("m0", None)
    for step in range(3):  # calls 2 and 3 of each adapter replay a graph; training moves the weights in between
        for model_id in ("m0", "m1"):
            backend.forward_backward(model_id, train, "cross_entropy", {}, False)
            backend.optim_step(model_id, AdamParams(learning_rate=1e-2))
            got, want = forward(model_id, graphs), forward(model_id, uncaptured)
            assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)), (step, model_id)
            plain = forward(model_id, None)  # the ordinary path (flash attention, no mask): the same up to rounding
            assert all(np.allclose(g, p, atol=2e-2) for g, p in zip(got, plain, strict=True)), (step, model_id)
    assert not np.allclose(forward("m0", graphs)[0], before[0], atol=2e-2)  # the graph saw the trained weights
    assert graphs.plan.enabled
    assert {key[0] for key in graphs.plan.graphs} == {"adapter_0", "adapter_1"}
    backend.remove_adapter("m0")
    assert {key[0] for key in graphs.plan.graphs} == {"adapter_1"}
