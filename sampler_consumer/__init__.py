"""The sampler: consumes Sample events, generates with per-row LoRA adapters, publishes SampleResults.

worker.py (Kafka loop, dead letters, batching window) -> service.py (sessions, adapters, validation, results)
-> engine.py (batched prefill + decode) over lora.py (per-row LoRA) and adapter_cache.py (LRU of adapters).
"""
