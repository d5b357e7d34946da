"""The PEFT LoraConfig of an adapter and its adapter_config.json, as every backend writes it (so the sampler and
`PeftModel.from_pretrained` load either backend's checkpoints unchanged)."""

from __future__ import annotations

from typing import Any

from trainer_consumer.backends.base import AdapterSpec


def lora_config(spec: AdapterSpec) -> Any:  # -> peft.LoraConfig (peft imported lazily: it pulls transformers)
    from peft import LoraConfig

    # PEFT annotates lora_alpha as int and computes with it as a float: our alpha is a float.
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules,  # type: ignore[arg-type]
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def adapter_config(config: dict[str, Any], spec: AdapterSpec) -> dict[str, Any]:
    """adapter_config.json: a LoraConfig's dict naming the base model, with JSON-safe values."""
    return json_safe({**config, "base_model_name_or_path": spec.base_model})


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(json_safe(v) for v in value)
    if isinstance(value, str):  # str-valued enums (PeftType, TaskType) become plain strings
        return str(value.value) if hasattr(value, "value") else value
    return value
