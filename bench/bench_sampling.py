"""Decode throughput of the sampler engine vs static-cache compiled `generate` with one PEFT adapter.

Random weights built from a config shape (no downloads), random LoRA adapters (rank --rank on the 7
projections), random prompts, every row generating exactly --new-tokens (stop=[]), temperature 1.
Per batch size: the baseline (PEFT model + HF generate with a static cache, which transformers compiles), then
the engine with 1 adapter and with --adapters different adapters in flight. Each engine row also reports the
milliseconds per engine step and the fraction of the bandwidth bound: the bytes a decode step must read (weights,
the adapters' slots, the KV cache filled so far, averaged over the run) over the device's measured copy bandwidth.

    python bench/bench_sampling.py --model-config smollm2 --device cpu --batch 1,8 --new-tokens 16
    python bench/bench_sampling.py --model-config llama-8b --device cuda --batch 64,256 --new-tokens 128
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
from sampler_consumer.attention import decode_attention_torch, decode_attention_triton, triton
from sampler_consumer.config import SamplerConfig, resolve_device, resolve_dtype
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


def check_against_teacher_forcing(engine: Engine, prompts: torch.Tensor, adapters: list[LoraAdapter],
                                  new_tokens: int) -> None:
    """The logprobs the engine reports for its sampled tokens (decode path: paged attention kernel, CUDA graphs)
    vs one prefill pass over prompt + tokens with prompt logprobs (SDPA). A broken cache, page table, mask or
    position shows up as differences of order 1; bf16 rounding alone stays around 1e-2."""
    params = p.SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0, stop=[])
    rows = [(prompts[i].tolist(), adapters[i % len(adapters)]) for i in range(prompts.shape[0])]
    sampled = engine.generate([GenRequest(prompt, params, adapter=a, first_sample=i)
                               for i, (prompt, a) in enumerate(rows)])
    forced = engine.generate([
        GenRequest(prompt + out.sequences[0].tokens, p.SamplingParams(max_tokens=0), adapter=a, prompt_logprobs=True)
        for (prompt, a), out in zip(rows, sampled, strict=True)])
    diffs = torch.cat([torch.tensor(f.prompt_logprobs[len(prompt):]) - torch.tensor(s.sequences[0].logprobs)
                       for (prompt, _), s, f in zip(rows, sampled, forced, strict=True)]).abs()
    print(f"# check: sampled-token logprobs vs teacher forcing over {diffs.numel()} tokens: "
          f"max |diff| {diffs.max():.2e}, mean {diffs.mean():.2e}", flush=True)


def engine_steps(engine: Engine) -> int:
    """Steps the engine has run so far (read on its thread; 0 before its first request)."""
    name = engine.base.name
    return engine.core.call(lambda core: core.engines[name].steps if name in core.engines else 0).result()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a device-to-device copy of 2 GiB (the ceiling a decode step meets)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(2**30, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() * src.element_size() / (time.perf_counter() - t0)


def step_bytes(model: torch.nn.Module, engine: Engine, n_adapters: int, rows: int, avg_len: float) -> float:
    """Bytes one decode step reads: every weight once (a tied embedding once, as lm_head), the slot stacks of
    the adapters in use (at the stacks' rank), and each row's filled KV cache."""
    seen, weights = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            weights += param.numel() * param.element_size()
    if not model.config.tie_word_embeddings:
        embed = model.get_input_embeddings().weight
        weights -= embed.numel() * embed.element_size()  # decode gathers `rows` rows of it, not the table
    lora = 0
    for wrapper in engine.base.lora.wrappers.values():
        if wrapper.a_stack is not None:
            per_slot = (wrapper.a_stack[0].numel() + wrapper.b_stack[0].numel()) * wrapper.a_stack.element_size()
            lora += n_adapters * per_slot
    kv = rows * avg_len * engine.model_engine.model.kv_bytes_per_token
    return weights + lora + kv


def attention_micro(device: torch.device, dtype: torch.dtype, shape: str, rows: int, length: int) -> None:
    """One layer's decode attention: the Triton paged kernel vs torch SDPA over gathered pages (the fallback)."""
    if device.type != "cuda" or triton is None:
        return
    cfg = SHAPES[shape]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dim = cfg["hidden_size"] // heads
    page = 16
    pages_per_row = -(-length // page)
    k = torch.randn(rows * pages_per_row + 1, page, kv_heads, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    table = (1 + torch.randperm(rows * pages_per_row, device=device)).view(rows, pages_per_row).int()
    lens = torch.full((rows,), length, device=device, dtype=torch.int32)
    q = torch.randn(rows, heads, dim, device=device, dtype=dtype)
    kv_bytes = 2 * rows * length * kv_heads * dim * k.element_size()
    results = {}
    for name, fn in (("triton paged kernel", decode_attention_triton), ("torch gather + SDPA", decode_attention_torch)):
        out = fn(q, k, v, table, lens, dim**-0.5)
        for _ in range(3):
            fn(q, k, v, table, lens, dim**-0.5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn(q, k, v, table, lens, dim**-0.5)
        torch.cuda.synchronize()
        results[name] = ((time.perf_counter() - t0) / 20, out)
    diff = (results["triton paged kernel"][1].float() - results["torch gather + SDPA"][1].float()).abs().max()
    for name, (seconds, _) in results.items():
        print(f"# attention {shape}, {rows} rows x {length} positions: {name} {1e6 * seconds:.0f} us "
              f"({kv_bytes / seconds / 1e12:.2f} TB/s of KV)", flush=True)
    print(f"# attention max |triton - torch| {diff:.2e}", flush=True)


def rl_round(engine: Engine, vocab: int, groups: int, group_size: int, prompt_len: int, new_tokens: int,
             lone: int) -> None:
    """The rl_basic rollout shape straight into the engine (no bus): groups x group_size requests of one sample
    (identical prompts within a group), then groups requests of group_size samples; and the latency of lone
    one-token requests submitted one after another while the first round runs (time to first token)."""
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=generator).tolist() for _ in range(groups)]
    params = p.SamplingParams(max_tokens=new_tokens, temperature=1.0, stop=[])
    one = p.SamplingParams(max_tokens=1, temperature=1.0, stop=[])
    for per_call in (True, False, True):
        requests = ([GenRequest(prompt, params) for prompt in prompts for _ in range(group_size)] if per_call
                    else [GenRequest(prompt, params, num_samples=group_size) for prompt in prompts])
        t0 = time.perf_counter()
        futures = [engine.submit(r) for r in requests]
        latencies = []
        if per_call and lone:
            time.sleep(0.2)
            for _ in range(lone):
                t1 = time.perf_counter()
                engine.submit(GenRequest(prompts[0][::-1], one)).result()
                latencies.append(time.perf_counter() - t1)
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        tokens = sum(len(s.tokens) for r in results for s in getattr(r, "sequences", []))
        failed = sum(1 for r in results if not hasattr(r, "sequences"))
        shape = f"{len(requests)} x {1 if per_call else group_size}"
        print(f"# engine alone, RL round {shape}: {wall:.2f} s, {tokens / wall:,.0f} tok/s, {failed} failed",
              flush=True)
        if latencies:
            latencies.sort()
            print(f"#   lone 1-token requests during it: p50 {1000 * statistics.median(latencies):.0f} ms, "
                  f"p99 {1000 * latencies[round(0.99 * (len(latencies) - 1))]:.0f} ms", flush=True)
            lone = 0


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
    parser.add_argument("--profile", help="append a torch.profiler kernel table of one engine run to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--static-baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time generate with a static cache (transformers compiles its decode step)")
    parser.add_argument("--rl-round", action="store_true",
                        help="also run the rl_basic rollout round (128 prompts x 16) straight into the engine")
    parser.add_argument("--check", action="store_true",
                        help="first check the engine's sampled-token logprobs against teacher forcing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    batches = [int(b) for b in args.batch.split(",")]
    config = SamplerConfig(adapter_cache_size=args.adapters).resolved(device)

    model = build_model(args.model_config, device, dtype)
    baseline = None
    if args.static_baseline:
        baseline = get_peft_model(copy.deepcopy(model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                   target_modules=PROJECTIONS)).eval()
    bank = LoraBank(model, device, dtype, slots=args.adapters + 1, max_rank=config.max_lora_rank)
    base = BaseModel(name=args.model_config, model=model, tokenizer=None, lora=bank, eos_ids=frozenset(),
                     vocab_size=model.config.vocab_size, max_positions=8192, device=device, dtype=dtype)
    engine = Engine(base, config)
    adapters = [random_adapter(model, i, args.rank, device, dtype) for i in range(args.adapters)]
    params = p.SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=0, stop=[])
    prompts = torch.randint(2, model.config.vocab_size, (max(batches), args.prompt_len), generator=torch.Generator()
                            .manual_seed(1))
    bandwidth = copy_bandwidth(device)

    print(f"# {args.model_config} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {torch.get_num_threads()} threads), {dtype}, LoRA rank {args.rank} (slots of rank "
          f"{config.max_lora_rank}), prompt {args.prompt_len}, {args.new_tokens} new tokens, CUDA graphs "
          f"{config.cuda_graphs}, kernels {config.kernels}, median of {args.repeats}; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s", flush=True)
    if args.check:
        check_against_teacher_forcing(engine, prompts[:8], adapters, args.new_tokens)
    for batch in batches:
        attention_micro(device, dtype, args.model_config, batch, args.prompt_len + args.new_tokens)
    print("| scenario | batch | adapters | tokens/s | vs generate static+compile | ms/step | of bandwidth bound | "
          "peak GiB |\n|---|---|---|---|---|---|---|---|")
    for batch in batches:
        ids = prompts[:batch].to(device)
        tokens = batch * args.new_tokens
        static_ref = float("nan")
        if baseline is not None:
            reset_peak(device.type)
            static_ref = tokens / timed(lambda ids=ids: run_generate(baseline, ids, args.new_tokens, static=True),
                                        device, args.repeats)
            print(f"| model.generate + PEFT, static cache + compile | {batch} | 1 | {static_ref:,.0f} | 1.00 | | | "
                  f"{peak_gib(device.type):.1f} |", flush=True)
        for n_adapters in sorted({1, args.adapters}):
            if n_adapters > batch:
                continue
            requests = [GenRequest(ids[i].tolist(), params, adapter=adapters[i % n_adapters], first_sample=i)
                        for i in range(batch)]
            reset_peak(device.type)
            steps_before = engine_steps(engine)
            seconds = timed(lambda r=requests: engine.generate(r), device, args.repeats)
            step_s = seconds / ((engine_steps(engine) - steps_before) / (args.repeats + 1))  # warm-up run included
            bound_s = step_bytes(model, engine, n_adapters, batch,
                                 args.prompt_len + args.new_tokens / 2) / bandwidth
            rate = tokens / seconds
            print(f"| sampler engine | {batch} | {n_adapters} | {rate:,.0f} | {rate / static_ref:.2f} | "
                  f"{1000 * step_s:.2f} | {bound_s / step_s:.0%} | {peak_gib(device.type):.1f} |", flush=True)
            if n_adapters == args.adapters:
                profile_to(args.profile, lambda r=requests: engine.generate(r), device.type,
                           f"sampler engine, batch {batch}, {n_adapters} adapters")
    if args.rl_round:
        rl_round(engine, model.config.vocab_size, 128, 16, args.prompt_len, args.new_tokens, lone=20)
    engine.close()


if __name__ == "__main__":
    main()
