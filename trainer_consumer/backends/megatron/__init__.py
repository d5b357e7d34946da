"""The Megatron training backend (`--backend megatron`): megatron-core GPTModel + our own multi-adapter LoRA.

- config.py     HF Llama/Qwen2 config -> TransformerConfig / GPTModel (local spec, SDPA attention: attention.py)
- layout.py     where each HF projection lives in megatron's fused, TP-sharded linears
- convert.py    HF <-> megatron base weights
- lora.py       LoRA as forward hooks, PEFT-named and TP-sharded like the linear each one wraps
- forward.py    per-token target logprobs (chunked, vocabulary-parallel)
- optimizer.py  the shared AdapterOptimizer with a TP-global gradient norm
- engine.py     the TrainingBackend methods as every TP rank runs them
- backend.py    MegatronBackend: TP=1 in-process, TP>1 rank 0 driving spawned worker ranks
- parallel.py   process groups, the CPU shim, shard/gather helpers
"""
