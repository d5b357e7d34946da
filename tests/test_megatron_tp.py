"""Tensor parallelism on CPU: TP=2 and TP=4 (processes over gloo) give what TP=1 gives, call for call.

Each TP>1 backend runs in a spawned process (its rank 0, which spawns the other ranks), so this pytest process
never joins a multi-rank process group; the TP=1 reference runs in-process, once for both sizes. The tiny models
have 8 query and 4 key/value heads (hidden 64, so 2 query heads per key/value head on each of 4 ranks), FFN
widths 128 / 96 and vocabularies 256 / 255 (the odd one padded to a multiple of the TP size): the smallest
shapes that TP=4 divides.
"""

from __future__ import annotations

import multiprocessing
import os
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


def _run_tensor_parallel(tp_size: int, bases: dict[str, tuple[str, int]], result_file: str) -> None:
    # 2 CI cores for up to 4 ranks: one thread each keeps them from fighting over the cores in every collective.
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the ranks this process spawns
    torch.set_num_threads(1)
    backend = MegatronBackend(tp_size=tp_size, **BACKEND_OPTIONS)
    try:
        out = scenario(backend, bases)
        out["ranks"] = len(backend.peak_memory_gib(reset=True))
        torch.save(out, result_file)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, int]]:
    heads = {"num_heads": 8, "num_kv_heads": 4}
    return {"llama": (str(make_tiny_model(tmp_path_factory.mktemp("llama") / "m", **heads)), 256),
            "qwen2": (str(make_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "m", **heads)), 255)}


@pytest.fixture(scope="module")
def tp1(bases: dict[str, tuple[str, int]]) -> dict[str, Any]:
    return scenario(MegatronBackend(tp_size=1, **BACKEND_OPTIONS), bases)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_matches_tensor_parallel_1(tp_size: int, bases, tp1, tmp_path: Path) -> None:
    result_file = tmp_path / f"tp{tp_size}.pt"
    child = multiprocessing.get_context("spawn").Process(target=_run_tensor_parallel,
                                                         args=(tp_size, bases, str(result_file)))
    child.start()
    child.join(timeout=600)
    if child.is_alive():
        child.kill()
        pytest.fail(f"the TP={tp_size} run did not finish in 600 s")
    assert child.exitcode == 0
    got_all = torch.load(result_file, weights_only=False)

    assert got_all.pop("ranks") == tp_size  # every rank answered the per-GPU memory query
    assert got_all.keys() == tp1.keys()
    assert "token id 9999" in got_all["error"]
    for key, expected in tp1.items():
        got = got_all[key]
        if isinstance(expected, dict):
            assert max_diff(expected, got) < TOLERANCE, key
        elif isinstance(expected, list):
            assert max_logprob_diff(expected, got) < TOLERANCE, key
        elif isinstance(expected, float):
            assert abs(got - expected) < TOLERANCE * max(1.0, abs(expected)), key
    assert max_diff(got_all["qwen2/init"], tp1["qwen2/init"]) == 0.0  # same seed, same adapter at any TP size
    assert max_diff(got_all["llama/restored"], got_all["llama/moments"]) == 0.0
