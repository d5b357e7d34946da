"""LoRA targets by PEFT module name: part of the checkpoint format (adapter_config.json `target_modules`), so every
backend maps its own layers to these names and every reader of a checkpoint interprets them the same way.
Torch-free, so the gateway and the storage can name them too."""

from __future__ import annotations

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


def target_modules(train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """The modules a LoRA spec trains, in the order PEFT configs list them."""
    return [*(ATTN_MODULES if train_attn else ()), *(MLP_MODULES if train_mlp else ()),
            *(UNEMBED_MODULES if train_unembed else ())]


def trained_blocks(modules: list[str] | tuple[str, ...]) -> tuple[bool, bool, bool]:
    """(train_attn, train_mlp, train_unembed) of a checkpoint's target_modules."""
    chosen = set(modules)
    return bool(chosen & set(ATTN_MODULES)), bool(chosen & set(MLP_MODULES)), bool(chosen & set(UNEMBED_MODULES))
