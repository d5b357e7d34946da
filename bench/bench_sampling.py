"""Sampling throughput of the sampler engine vs plain `model.generate` with one PEFT adapter.

Random weights built from a config shape (no downloads), random LoRA adapters (rank --rank on the 7
projections), random prompts, every row generating exactly --new-tokens (stop=[]), temperature 1.
Scenarios per batch size: the baseline (PEFT model + HF generate, one adapter), the engine with 1 adapter,
and the engine with 8 different adapters in flight (batch >= 8). One table, ratios vs the baseline of the
same batch size measured in the same run.

    python bench/bench_sampling.py --model-config smollm2 --device cpu --batch 1,8 --new-tokens 16
    python bench/bench_sampling.py --model-config llama-8b --device cuda --batch 1,8,32,64 --new-tokens 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shapes import SHAPES
from bench.timing import peak_gib, profile_to, reset_peak
from bus_events import payloads as p
from sampler_consumer.config import SamplerConfig, resolve_cache_mode, resolve_device, resolve_dtype
from sampler_consumer.engine import Engine, GenRequest
from sampler_consumer.lora import LoraAdapter, LoraBank, LoraModule
from sampler_consumer.models import BaseModel

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=0, eos_token_id=1,
                         pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: an 8B model never passes through host memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def random_adapter(model: torch.nn.Module, index: int, rank: int, device: torch.device,
                   dtype: torch.dtype) -> LoraAdapter:
    generator = torch.Generator().manual_seed(index)
    modules = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            modules[name] = LoraModule(a.to(device, dtype), b.to(device, dtype), scale=2.0)
    return LoraAdapter(key=(f"bench://adapter-{index}", "v"), modules=modules, rank=rank)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` runs after one warm-up run (compilation, allocator, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, static: bool = False) -> None:
    """HF generate; `static` uses a static KV cache, with which transformers compiles the decoding forward."""
    extra = {"cache_implementation": "static"} if static else {}
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=True, top_k=0, temperature=1.0, **extra)


def check_against_teacher_forcing(engine: Engine, base: BaseModel, prompts: torch.Tensor,
                                  adapters: list[LoraAdapter], new_tokens: int) -> None:
    """The logprobs the engine reports for its sampled tokens vs one uncached forward pass over prompt + tokens
    (dynamic engine, prompt logprobs). A broken cache, mask or position shows up as differences of order 1;
    bf16 rounding alone stays around 1e-2. (Greedy tokens are no test on random weights: near-ties everywhere.)"""
    params = p.SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0, stop=[])
    rows = [(prompts[i].tolist(), adapters[i % len(adapters)]) for i in range(prompts.shape[0])]
    sampled = engine.generate([GenRequest(prompt, params, adapter=a, first_sample=i)
                               for i, (prompt, a) in enumerate(rows)])
    forced = Engine(base, "dynamic", False).generate([
        GenRequest(prompt + out.sequences[0].tokens, p.SamplingParams(max_tokens=0), adapter=a, prompt_logprobs=True)
        for (prompt, a), out in zip(rows, sampled, strict=True)])
    diffs = torch.cat([torch.tensor(f.prompt_logprobs[len(prompt):]) - torch.tensor(s.sequences[0].logprobs)
                       for (prompt, _), s, f in zip(rows, sampled, forced, strict=True)]).abs()
    print(f"# check: sampled-token logprobs vs teacher forcing over {diffs.numel()} tokens: "
          f"max |diff| {diffs.max():.2e}, mean {diffs.mean():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (rows decoded together)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8, help="adapters in flight in the multi-adapter rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-mode", choices=["auto", "dynamic", "static"], default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--compile-mode", default=SamplerConfig.compile_mode,
                        help='comma-separated torch.compile modes of the engine, one row each, e.g. '
                             '"default,reduce-overhead"')
    parser.add_argument("--profile", help="append a torch.profiler kernel table of one engine run to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--static-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time generate with a static cache (transformers compiles its decode step)")
    parser.add_argument("--check", action="store_true",
                        help="first check the engine's sampled-token logprobs against teacher forcing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    compile_flag = None if args.compile == "auto" else args.compile == "on"
    cache_mode, compiled = resolve_cache_mode(SamplerConfig(cache_mode=args.cache_mode, compile=compile_flag), device)
    batches = [int(b) for b in args.batch.split(",")]

    model = build_model(args.model_config, device, dtype)
    baseline = get_peft_model(copy.deepcopy(model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                               target_modules=PROJECTIONS)).eval()
    bank = LoraBank(model, device, dtype)
    base = BaseModel(name=args.model_config, model=model, tokenizer=None, lora=bank, eos_ids=frozenset(),
                     vocab_size=model.config.vocab_size, max_positions=8192, device=device, dtype=dtype)
    modes = args.compile_mode.split(",") if compiled else ["-"]
    engines = {mode: Engine(base, cache_mode, compiled, compile_mode=mode) for mode in modes}
    engine = engines[modes[-1]]
    adapters = [random_adapter(model, i, args.rank, device, dtype) for i in range(args.adapters)]
    params = p.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0, stop=[])
    prompts = torch.randint(2, model.config.vocab_size, (max(batches), args.prompt_len), generator=torch.Generator()
                            .manual_seed(1))

    print(f"# {args.model_config} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {torch.get_num_threads()} threads), {dtype}, LoRA rank {args.rank}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, engine cache={cache_mode} compiled={compiled} ({'/'.join(modes)}), "
          f"median of {args.repeats}")
    if args.check:
        check_against_teacher_forcing(engine, base, prompts.to(device), adapters, args.new_tokens)
    print("| scenario | batch | adapters | tokens/s | vs generate | vs generate static+compile | peak GiB |\n"
          "|---|---|---|---|---|---|---|")
    for batch in batches:
        ids = prompts[:batch].to(device)
        tokens = batch * args.new_tokens
        reset_peak(device.type)
        reference = tokens / timed(lambda ids=ids: run_generate(baseline, ids, args.new_tokens), device, args.repeats)
        print(f"| model.generate + PEFT | {batch} | 1 | {reference:,.0f} | 1.00 | | {peak_gib(device.type):.1f} |",
              flush=True)
        static_ref = float("nan")
        if args.static_baseline:
            reset_peak(device.type)
            static_ref = tokens / timed(lambda ids=ids: run_generate(baseline, ids, args.new_tokens, static=True),
                                        device, args.repeats)
            print(f"| model.generate + PEFT, static cache + compile | {batch} | 1 | {static_ref:,.0f} | "
                  f"{static_ref / reference:.2f} | 1.00 | {peak_gib(device.type):.1f} |", flush=True)
        for mode, engine in engines.items():
            for n_adapters in (1, args.adapters):
                if n_adapters > batch:
                    continue
                requests = [GenRequest(ids[i].tolist(), params, adapter=adapters[i % n_adapters], first_sample=i)
                            for i in range(batch)]
                reset_peak(device.type)
                rate = tokens / timed(lambda r=requests, e=engine: e.generate(r), device, args.repeats)
                print(f"| sampler engine ({mode}) | {batch} | {n_adapters} | {rate:,.0f} | {rate / reference:.2f} | "
                      f"{rate / static_ref:.2f} | {peak_gib(device.type):.1f} |", flush=True)
                if n_adapters == args.adapters:
                    profile_to(args.profile, lambda r=requests, e=engine: e.generate(r), device.type,
                               f"sampler engine ({mode}), batch {batch}, {n_adapters} adapters")


if __name__ == "__main__":
    main()
