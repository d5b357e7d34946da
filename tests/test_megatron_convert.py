"""HF config -> megatron GPTModel, and HF <-> megatron weights (TP=1, in-process, gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron_support import TOLERANCE, make_tiny_qwen2
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from bus_runtime.testing import make_tiny_model
from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.megatron.config import build_gpt_model, model_shape
from trainer_consumer.backends.megatron.convert import load_hf_weights, megatron_to_hf, safetensors_source
from trainer_consumer.backends.megatron.forward import decoder_hidden_states
from trainer_consumer.backends.megatron.layout import deinterleave, interleave
from trainer_consumer.backends.megatron.parallel import free_tcp_init_method, init_tensor_parallel

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module", autouse=True)
def tensor_parallel_1() -> None:
    init_tensor_parallel(0, 1, free_tcp_init_method())


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    return make_tiny_model(directory) if request.param == "llama" else make_tiny_qwen2(directory)


def test_model_shape_reads_llama_and_qwen2_configs() -> None:
    llama = model_shape(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True))
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.heads_per_group) == (8, 2, 8, 4)
    assert llama.tied_embeddings and not llama.qkv_bias and llama.rope == {}
    assert llama.padded_vocab_size(1) == 300 and llama.padded_vocab_size(8) == 304
    qwen = model_shape(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, rope_theta=1e6))
    assert qwen.qkv_bias and not qwen.tied_embeddings and qwen.rope_theta == 1e6


def test_llama3_rope_scaling_maps_and_unknown_scaling_is_refused() -> None:
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    shape = model_shape(LlamaConfig(**base, rope_parameters=llama3))
    assert shape.rope == {"rope_scaling": True, "rope_scaling_factor": 32.0} and shape.rope_theta == 500000.0
    with pytest.raises(BackendInputError, match="RoPE scaling"):
        model_shape(LlamaConfig(**base, rope_parameters={**llama3, "original_max_position_embeddings": 4096}))
    with pytest.raises(BackendInputError, match="model type 'gpt2'"):
        model_shape(AutoConfig.for_model("gpt2"))


def test_interleave_is_inverted_by_deinterleave() -> None:
    q, k, v = torch.arange(12.0).reshape(6, 2), torch.arange(4.0).reshape(2, 2) + 100, torch.arange(4.0) + 200
    fused = interleave([q, k, v.reshape(2, 2)], groups=2, dim=0)
    assert fused[:, 0].tolist() == [0, 2, 4, 100, 200, 6, 8, 10, 102, 202]  # per group: its q rows, k row, v row
    assert all(torch.equal(a, b) for a, b in zip(deinterleave(fused, [6, 2, 2], 2, 0), [q, k, v.reshape(2, 2)],
                                                 strict=True))


def test_hf_weights_load_exactly_and_logits_match_transformers(hf_dir: Path) -> None:
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    shape = model_shape(hf_model.config)
    model = build_gpt_model(shape, tp_size=1, dtype=torch.float32)
    with safetensors_source(hf_dir) as source:
        load_hf_weights(model, source, shape, rank=0, size=1)

    original = load_file(hf_dir / "model.safetensors")
    back = megatron_to_hf(model, shape)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[name], original[name]) for name in original)

    ids = torch.randint(0, shape.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        hidden = decoder_hidden_states(model, ids)  # [s, b, h]
        weight = model.shared_embedding_or_output_weight() if shape.tied_embeddings else None
        logits, _ = model.output_layer(hidden, weight=weight)
    assert (logits.transpose(0, 1) - expected).abs().max() < TOLERANCE


def test_tensor_parallel_size_must_divide_the_kv_heads() -> None:
    shape = model_shape(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(BackendInputError, match="tensor parallel size 4 does not divide the key/value heads"):
        build_gpt_model(shape, tp_size=4, dtype=torch.float32)
