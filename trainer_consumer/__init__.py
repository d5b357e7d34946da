"""The trainer consumer: applies training events (create_model, forward_backward, optim_step, checkpoints...) to
LoRA adapters on frozen base models, in seq_id order per model, and answers on the reply topic.

worker.py (Kafka) -> intake.py (decode, bus_runtime.records) -> engine.py (carries out the actions each model's
scheduler, stream.py, decides: actions.py) -> ops/ (the op handlers) -> backends/ (tensors; TrainingBackend
protocol). Recovery (docs/recovery.md): recovery.py restores and snapshots through snapshots.py, durability.py
decides what may be committed; replay/ (with event_log.py) rebuilds a model from the log (`tinker-bus replay`,
`tinker-bus export-log`).
"""
