"""A tinker:// checkpoint merged into its base model: load the adapter from S3, find the base, merge."""

from __future__ import annotations

from pathlib import Path

import torch

from artifact_store import CheckpointStore, TinkerPath
from trainer_consumer.export.merge import MergeError, Progress, merge_lora

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_checkpoint(checkpoints: CheckpointStore, path: TinkerPath, out: Path, *, dtype: str | None = None,
                      base_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Merge the checkpoint at `path` (sampler weights or training state: both hold the adapter) into `out`.
    `base_dir` overrides where the base model's files are found (default: its name in adapter_config.json, resolved
    like the trainer resolves base models)."""
    from bus_runtime.base_models import resolve_base_model

    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    checkpoint = checkpoints.load(path)
    base = checkpoint.adapter_config.get("base_model_name_or_path")
    if base_dir is None:
        if not base:
            raise MergeError(f"{path}: adapter_config.json names no base_model_name_or_path")
        base_dir = resolve_base_model(base)
    return merge_lora(base_dir, checkpoint.adapter_config, checkpoint.adapter_weights, out,
                      dtype=DTYPES[dtype] if dtype else None, progress=progress)
