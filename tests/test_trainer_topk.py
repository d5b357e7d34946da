"""[N, K] target_tokens in the HF backend: cross_entropy over K targets per position is, in value and gradient,
the sum of K one-target calls (each column with its own weights), with or without micro-batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainer_support import adapter_grads

from bus_events import payloads as p
from bus_events import tensor_from_numpy
from bus_events.payloads import LoraSpec
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec, BackendInputError
from trainer_consumer.backends.hf_peft import HfPeftBackend

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def _data(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(5, 12))
        out.append((rng.integers(0, 200, n), rng.integers(0, 200, (n, K)), rng.uniform(-1, 1, (n, K))))
    return out


def _datum(tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> p.Datum:
    return p.Datum(tokens=tensor_from_numpy(tokens, "int32"), loss_fn_inputs={
        "target_tokens": tensor_from_numpy(targets, "int64"), "weights": tensor_from_numpy(weights, "float32")})


def _grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # float32 sums, other order


@pytest.mark.parametrize("micro_batch_tokens", [16384, 16])
def test_topk_cross_entropy_is_the_sum_of_its_columns(tiny, micro_batch_tokens):
    spec = AdapterSpec(base_model=tiny, lora=LoraSpec(rank=4, seed=3))
    topk, columns = HfPeftBackend(micro_batch_tokens=micro_batch_tokens), HfPeftBackend()
    topk.create_adapter("m", spec)
    columns.create_adapter("m", spec)
    data = _data(1, 4)
    out = topk.forward_backward("m", [_datum(*d) for d in data], "cross_entropy", {}, False)
    loss = 0.0
    for k in range(K):
        column = columns.forward_backward("m", [_datum(t, y[:, k], w[:, k]) for t, y, w in data],
                                          "cross_entropy", {}, False)
        loss += column.metrics["loss:sum"]
        for lp, lp_k in zip(out.logprobs, column.logprobs, strict=True):
            np.testing.assert_allclose(lp[:, k], lp_k, rtol=1e-5, atol=1e-5)
    assert [lp.shape for lp in out.logprobs] == [(len(t), K) for t, _, _ in data]
    assert out.metrics["loss:sum"] == pytest.approx(loss, rel=1e-4)
    _grads_close(adapter_grads(topk, "m"), adapter_grads(columns, "m"))


def test_topk_shapes_are_checked_naming_the_datum(tiny):
    backend = HfPeftBackend()
    backend.create_adapter("m", AdapterSpec(base_model=tiny, lora=LoraSpec(rank=4, seed=3)))
    (tokens, targets, weights), other = _data(2, 2)
    with pytest.raises(BackendInputError, match=r"data\[1\].*same K"):
        backend.forward_backward("m", [_datum(tokens, targets, weights),
                                       _datum(other[0], other[1][:, :2], other[2][:, :2])], "cross_entropy", {}, True)
    with pytest.raises(BackendInputError, match=r"data\[0\].loss_fn_inputs\['weights'\] has shape"):
        backend.forward_backward("m", [_datum(tokens, targets, weights[:, 0])], "cross_entropy", {}, True)


def test_a_backend_without_topk_refuses_two_dimensional_targets_naming_the_datum():
    from trainer_consumer.backends.batch import check_data

    (tokens, targets, weights), = _data(3, 1)
    data = [_datum(tokens, targets[:, 0], weights[:, 0]), _datum(tokens, targets, weights)]
    assert len(check_data(data[:1], vocab_size=200, max_positions=None, top_k_targets=False)) == 1
    with pytest.raises(BackendInputError, match=r"data\[1\].*is 2-D; this trainer backend computes 1-D"):
        check_data(data, vocab_size=200, max_positions=None, top_k_targets=False)
