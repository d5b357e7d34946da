"""LoRA merge and export: a checkpoint's adapter folded into its base model's weights, written as a plain
transformers model folder. Used by `tinker-bus export` and by the trainer's export op."""

from trainer_consumer.export.checkpoint import export_checkpoint
from trainer_consumer.export.merge import MergeError, merge_lora

__all__ = ["MergeError", "export_checkpoint", "merge_lora"]
