"""The trainer consumer: applies training events (create_model, forward_backward, optim_step, checkpoints...) to
LoRA adapters on frozen base models, in seq_id order per model, and answers on the reply topic.

worker.py (Kafka) -> engine.py (ordering, dedupe, ops) -> backends/ (tensors; TrainingBackend protocol).
"""
