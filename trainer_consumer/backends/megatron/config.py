"""HF Llama / Qwen2 config -> megatron-core TransformerConfig and GPTModel (local layer spec with SDPA attention,
no TE/apex)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.megatron.attention import sdpa_attention_class
from trainer_consumer.backends.megatron.parallel import apply_cpu_shim, device

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts the weight conversion and the LoRA layout need, read from an HF config."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    qkv_bias: bool
    rms_norm_eps: float
    rope_theta: float
    rope: dict[str, Any]  # GPTModel's rope keyword arguments beyond rotary_base

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def padded_vocab_size(self, tp_size: int) -> int:
        """megatron splits the vocabulary evenly over TP ranks; extra rows are zero and masked out of softmax."""
        return -(-self.vocab_size // tp_size) * tp_size


def _rope_kwargs(hf_config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, {}
    if rope_type == "linear":
        return theta, {"seq_len_interpolation_factor": float(params["factor"])}
    # megatron's llama3 scaling hard-codes low/high frequency factors 1 and 4 and an original context of 8192.
    llama3_fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if rope_type == "llama3" and all(float(params.get(k, v)) == v for k, v in llama3_fixed.items()):
        return theta, {"rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise BackendInputError(f"RoPE scaling {params} is not supported by the Megatron backend")


def model_shape(hf_config: Any) -> ModelShape:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BackendInputError(f"the Megatron backend supports {SUPPORTED_MODEL_TYPES}, not model type {model_type!r}")
    if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
        raise BackendInputError("only SiLU-gated MLPs without bias are supported")
    if model_type == "llama" and getattr(hf_config, "attention_bias", False):
        raise BackendInputError("Llama with attention_bias is not supported (megatron biases all or only qkv)")
    if getattr(hf_config, "use_sliding_window", False):
        raise BackendInputError("sliding-window attention is not supported by the Megatron backend")
    theta, rope = _rope_kwargs(hf_config)
    num_heads = hf_config.num_attention_heads
    return ModelShape(
        model_type=model_type,
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_positions=hf_config.max_position_embeddings,
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=theta,
        rope=rope,
    )


def check_tensor_parallel(shape: ModelShape, tp_size: int) -> None:
    for what, count in (("key/value heads", shape.num_kv_heads), ("FFN width", shape.ffn_hidden_size)):
        if count % tp_size:
            raise BackendInputError(f"tensor parallel size {tp_size} does not divide the {what} ({count})")


def transformer_config(shape: ModelShape, *, tp_size: int, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Base weights come from the HF checkpoint: random init would be wasted work.
        perform_initialization=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Every fused kernel needs TE or apex, neither of which is installed (offline-models.md section 7/8).
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def build_gpt_model(shape: ModelShape, *, tp_size: int, dtype: torch.dtype):
    """A GPTModel with the architecture of `shape` and uninitialised weights (load_hf_weights fills them)."""
    apply_cpu_shim()
    check_tensor_parallel(shape, tp_size)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer_spec.submodules.self_attention.submodules.core_attention = sdpa_attention_class()
    model = GPTModel(
        config=transformer_config(shape, tp_size=tp_size, dtype=dtype),
        transformer_layer_spec=layer_spec,
        vocab_size=shape.padded_vocab_size(tp_size),
        max_sequence_length=shape.max_positions,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
        share_embeddings_and_output_weights=shape.tied_embeddings,
        parallel_output=True,
        **shape.rope,
    )
    # torch-native norms (no apex) are created on the default device, the parallel linears on the current GPU.
    return model.to(device=device(), dtype=dtype)
