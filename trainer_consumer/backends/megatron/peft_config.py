"""The PEFT adapter_config.json of an adapter: what the HF backend writes, so the sampler serves either unchanged."""

from __future__ import annotations

from typing import Any

from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import _json_safe


def adapter_config(spec: AdapterSpec) -> dict[str, Any]:
    from peft import LoraConfig

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM").to_dict()
    config["base_model_name_or_path"] = spec.base_model
    return _json_safe(config)
