"""What the opt-in sampling outputs of issue 16.2 cost on the sampler engine (random weights of a config shape, base
model, random prompts, every row generating exactly --new-tokens, temperature 1):

- decode, default: no option asked (the path every RL rollout takes);
- decode + topk_sample_logprobs=--k on every row;
- prefill-only scoring (max_tokens 1) of the same prompts with prompt logprobs, with target_prompt_logprobs
  (--k ids per position) and with prompt_alt_tokens_k=--k.

    python bench/bench_sample_outputs.py --model-config smollm2 --device cpu --batch 8 --new-tokens 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_sampling import build_model, timed
from bench.shapes import SHAPES
from bus_events import payloads as p
from sampler_consumer.config import SamplerConfig, resolve_device, resolve_dtype
from sampler_consumer.engine import Engine, GenRequest
from sampler_consumer.lora import LoraBank
from sampler_consumer.models import BaseModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = SamplerConfig().resolved(device)
    model = build_model(args.model_config, device, dtype)
    bank = LoraBank(model, device, dtype, slots=2, max_rank=config.max_lora_rank)
    base = BaseModel(name=args.model_config, model=model, tokenizer=None, lora=bank, eos_ids=frozenset(),
                     vocab_size=model.config.vocab_size, max_positions=8192, device=device, dtype=dtype)
    engine = Engine(base, config)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, model.config.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    decode = p.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0, stop=[])
    score = p.SamplingParams(max_tokens=1, temperature=1.0, seed=0, stop=[])
    ids = rng.integers(0, model.config.vocab_size, (args.prompt_len - 1, args.k))
    cases = {
        "decode, default": (decode, {}),
        f"decode + topk_sample_logprobs={args.k}": (decode, {"topk_sample_logprobs": args.k}),
        "score: prompt_logprobs": (score, {"prompt_logprobs": True}),
        f"score: target_prompt_logprobs K={args.k}": (score, {"target_prompt_ids": ids}),
        f"score: prompt_alt_tokens_k={args.k}": (score, {"prompt_alt_tokens_k": args.k}),
    }
    print(f"# {args.model_config} on {device}, {dtype}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, CUDA graphs {config.cuda_graphs}, median of "
          f"{args.repeats}\n| case | seconds | tokens/s (sampled + prompt) |\n|---|---|---|")
    for name, (params, options) in cases.items():
        def run(params: p.SamplingParams = params, options: dict = options) -> None:
            engine.generate([GenRequest(prompt, params, **options) for prompt in prompts])
        seconds = timed(run, device, args.repeats)
        tokens = args.batch * (params.max_tokens + (args.prompt_len if params is score else 0))
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:,.0f} |", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
