"""The trainer consumer: applies training events (create_model, forward_backward, optim_step, checkpoints...) to
LoRA adapters on frozen base models, in seq_id order per model, and answers on the reply topic.

worker.py (Kafka) -> intake.py (decode) -> engine.py (ordering, dedupe, ops, recovery) -> backends/ (tensors;
TrainingBackend protocol). Recovery (docs/recovery.md): snapshots.py + durability.py decide what may be committed;
replay.py + event_log.py rebuild a model from the log (`tinker-bus replay`, `tinker-bus export-log`).
"""
