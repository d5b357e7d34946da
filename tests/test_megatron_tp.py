"""Tensor parallelism on CPU: TP=2 (two processes over gloo) gives what TP=1 gives, call for call.

The TP=2 backend runs in a spawned process (its rank 0, which spawns rank 1), so this pytest process never joins
a two-rank process group; the TP=1 reference runs in-process.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from megatron_support import TOLERANCE, loss_data, make_tiny_qwen2, max_diff, max_logprob_diff, random_adapter

from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from bus_events.tensors import tensor_from_numpy
from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import AdapterSpec, BackendInputError
from trainer_consumer.backends.megatron.backend import MegatronBackend

pytest.importorskip("megatron.core")

# eps = 1e-3: see the ADAM comment in test_megatron_backend.py
ADAM = p.AdamParams(learning_rate=1e-2, eps=1e-3, weight_decay=0.01, grad_clip_norm=0.5)
# Exercise micro-batches, logprob chunks, and layer recompute (which repeats TP collectives in backward).
BACKEND_OPTIONS = {"micro_batch_tokens": 16, "logprob_chunk_tokens": 5, "gradient_checkpointing": True}


def scenario(backend: MegatronBackend, bases: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The same calls for every TP size; returns everything observable."""
    out: dict[str, Any] = {}
    for arch, (path, vocab) in bases.items():
        spec = AdapterSpec(base_model=path, lora=LoraSpec(rank=4, seed=3))
        backend.create_adapter(arch, spec)
        out[f"{arch}/init"] = backend.export_adapter(arch).weights
        backend.load_adapter(arch, random_adapter(out[f"{arch}/init"], seed=5), None)
        for step, loss_fn in enumerate(("ppo", "cross_entropy")):
            data = loss_data(loss_fn, seed=step, vocab=vocab)
            result = backend.forward_backward(arch, data, loss_fn, {}, forward_only=False)
            out[f"{arch}/logprobs{step}"], out[f"{arch}/loss{step}"] = result.logprobs, result.metrics["loss:sum"]
            out[f"{arch}/grad_norm{step}"] = backend.optim_step(arch, ADAM)["grad_norm"]
        out[f"{arch}/weights"] = backend.export_adapter(arch).weights
        out[f"{arch}/moments"] = backend.export_optimizer(arch)
        out[f"{arch}/after"] = backend.forward_backward(arch, loss_data("dro", 9, vocab), "dro", {}, True).logprobs
        # A checkpoint written at this TP size restores exactly (weights and moments, re-sharded on load).
        backend.create_adapter(f"{arch}/restored", spec)
        backend.load_adapter(f"{arch}/restored", out[f"{arch}/weights"], out[f"{arch}/moments"])
        out[f"{arch}/restored"] = backend.export_optimizer(f"{arch}/restored")
    bad = [p.Datum(tokens=tensor_from_numpy(np.array([1, 9999]), "int32"),
                   loss_fn_inputs={"target_tokens": tensor_from_numpy(np.array([2, 3]), "int64")})]
    try:
        backend.forward_backward("llama", bad, "cross_entropy", {}, False)
    except BackendInputError as exc:
        out["error"] = str(exc)
    # Every rank rejected the request before any collective, so the group is still in step.
    out["after_error"] = backend.forward_backward("llama", loss_data("cispo", 4, 256), "cispo", {}, True).logprobs
    return out


def _run_tp2(bases: dict[str, tuple[str, int]], result_file: str) -> None:
    backend = MegatronBackend(tp_size=2, **BACKEND_OPTIONS)
    try:
        torch.save(scenario(backend, bases), result_file)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int]]:
    return {"llama": (str(make_tiny_model(tmp_path_factory.mktemp("llama") / "m")), 256),
            "qwen2": (str(make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "m")), 255)}


def test_tensor_parallel_2_matches_tensor_parallel_1(bases, tmp_path: Path) -> None:
    result_file = tmp_path / "tp2.pt"
    child = multiprocessing.get_context("spawn").Process(target=_run_tp2, args=(bases, str(result_file)))
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("the TP=2 run did not finish in 300 s")
    assert child.exitcode == 0
    tp2 = torch.load(result_file, weights_only=False)
    tp1 = scenario(MegatronBackend(tp_size=1, **BACKEND_OPTIONS), bases)

    assert tp2.keys() == tp1.keys()
    assert "token id 9999" in tp2["error"]
    for key, expected in tp1.items():
        got = tp2[key]
        if isinstance(expected, dict):
            assert max_diff(expected, got) < TOLERANCE, key
        elif isinstance(expected, list):
            assert max_logprob_diff(expected, got) < TOLERANCE, key
        elif isinstance(expected, float):
            assert abs(got - expected) < TOLERANCE * max(1.0, abs(expected)), key
    assert max_diff(tp2["qwen2/init"], tp1["qwen2/init"]) == 0.0  # same seed, same adapter at any TP size
    assert max_diff(tp2["llama/restored"], tp2["llama/moments"]) == 0.0
