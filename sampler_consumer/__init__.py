"""The sampler: consumes Sample events, generates with per-row LoRA adapters, publishes SampleResults.

worker.py (Kafka loop, dead letters, replies) -> service.py (sessions, adapter checkpoints, validation, results)
-> engine_core.py (the one thread that owns the device) -> scheduler.py (continuous batching over kv_pages.py's
paged KV cache with prefix sharing) and executor.py (prefill, CUDA-graph decode, sampling.py) over paged_model.py,
attention.py and lora.py / lora_kernels.py (adapter slots, segmented LoRA). requests.py is the typed boundary.
"""
