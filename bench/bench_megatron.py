"""Megatron backend (TP = 1, 2, 4, 8) vs HF + PEFT backend: one LoRA training step (forward_backward + optim_step).

Self-contained on the GPU box: random bf16 weights from a shape in bench/shapes.py are saved once to --workdir,
then each backend loads that folder through its normal path, so all train the very same model. Every variant runs
in a fresh process (a TP group of its own, nothing left on the GPUs by the one before). Prints one table per shape
(tok/s, MFU, peak memory per GPU, scaling vs TP=1 and TP=2), plus each variant's load time, first-step loss and
largest logprob difference to the first variant.

    pip install --no-deps .whl/megatron_core-0.19.2-*.whl   # the GPU box has no megatron-core
    python -m bench.bench_megatron --shapes llama-1b,llama-8b             # 1 GPU: HF vs Megatron TP=1
    python -m bench.bench_megatron --shapes llama-8b --tensor-parallel 1,2,4,8 --backends megatron   # 8 GPUs
    python -m bench.bench_megatron --shapes llama-70b --tensor-parallel 8 --backends megatron --steps 2
    python -m bench.bench_megatron --shapes llama-8b --checkpointing off,on   # activation checkpointing's cost
    python -m bench.bench_megatron --shapes tiny --tensor-parallel 1,2 --steps 2   # CPU smoke run

MFU counts model FLOPs, not what the GPU executes (a checkpointed recompute counts nothing): per step
4·N·tokens for the frozen base's matmuls (forward 2, backward 2 for the input gradients: a frozen weight has no
gradient), N = the seven projections of every layer plus the lm_head; 6·N_lora·tokens for the LoRA matrices
(they do get weight gradients); causal attention 2·s²·d per sequence and layer forward (QKᵀ and PV, half the
square), 3x that with backward; divided by (step time x GPUs x peak bf16 dense FLOP/s of one GPU: 989 TFLOP/s for
H100 / H200 SXM, else --peak-tflops).

Expected peak memory per GPU (a prediction to check against the tables, not a measurement): weights (bench/shapes.py
table) plus activations. Fitting the measured 8B peaks at 2 x 2048 tokens (TP=1 51.1 GiB, TP=2 28.9 GiB, minus
weights) gives about hidden x (12 + 60 / TP) bytes per token and layer: 12·hidden replicated on every rank
(residual stream, norms), the rest split. Then, at 2 x 2048 tokens:
    llama-8b   TP=4: 3.7 + 13.5 = 17 GiB        TP=8: 1.9 + 9.8 = 12 GiB
    llama-70b  TP=4: 32.9 + 67.5 = 100 GiB      TP=8: 16.4 + 48.7 = 65 GiB
so 70B fits an H200 (~139 GiB usable) with tensor parallelism alone at TP=4 and TP=8 (not at TP=2: 65.7 GiB of
weights + ~105 GiB of activations), without pipeline parallelism. Host memory: every rank reads the full
checkpoint tensor by tensor (convert.py) from the page cache, one tensor at a time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data import random_datums
from bench.shapes import DEFAULT_BATCH, SHAPES, build_model_dir, linear_params
from bench.timing import Row, peak_gib, reset_peak, timed_steps
from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from trainer_consumer.backends.base import AdapterSpec

ADAM = p.AdamParams(learning_rate=1e-5)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16 per GPU (SXM), NVIDIA datasheets


@dataclass(frozen=True)
class Variant:
    backend: str  # hf or megatron
    tp: int
    checkpointing: bool

    @property
    def label(self) -> str:
        name = f"megatron TP={self.tp}" if self.backend == "megatron" else self.backend
        return name + (" + act. ckpt" if self.checkpointing else "")


@dataclass
class Measured:
    variant: Variant
    row: Row
    peak_per_gpu: list[float]  # GiB, rank order
    load_s: float
    first_loss: float
    first_logprobs: np.ndarray


def make_backend(variant: Variant) -> Any:
    if variant.backend == "hf":
        from trainer_consumer.backends.hf_peft import HfPeftBackend

        return HfPeftBackend(gradient_checkpointing=variant.checkpointing)
    from trainer_consumer.backends.megatron.backend import MegatronBackend

    return MegatronBackend(tp_size=variant.tp, gradient_checkpointing=variant.checkpointing)


def bench_variant(variant: Variant, model_dir: Path, batch: int, length: int, args: argparse.Namespace) -> Measured:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reset_peak(device)
    backend = make_backend(variant)
    started = time.perf_counter()
    info = backend.base_model_info(str(model_dir))
    load_s = time.perf_counter() - started
    backend.create_adapter("bench", AdapterSpec(str(model_dir), LoraSpec(rank=args.rank, seed=0, train_unembed=False)))
    data = random_datums(batch, length, info.vocab_size)
    first = backend.forward_backward("bench", data, "cross_entropy", {}, forward_only=False)
    backend.discard_gradients("bench")

    def step() -> None:
        backend.forward_backward("bench", data, "cross_entropy", {}, forward_only=False)
        backend.optim_step("bench", ADAM)

    times = timed_steps(step, args.steps, args.warmup, device)
    per_gpu = backend.peak_memory_gib() if variant.backend == "megatron" else [peak_gib(device)]
    row = Row(variant.label, batch * length, times, max(per_gpu))
    print(f"  measured {row.name}: median step {row.median_s:.3f} s, peak per GPU "
          f"{', '.join(f'{gib:.2f}' for gib in per_gpu)} GiB", flush=True)
    backend.close()
    return Measured(variant, row, per_gpu, load_s, first.metrics["loss:sum"], np.concatenate(first.logprobs))


def _bench_in_child(result_file: str, variant: Variant, *args: Any) -> None:
    measured = bench_variant(variant, *args)
    # Plain fields only: this module's classes are __mp_main__'s here, which the parent cannot unpickle.
    torch.save({key: value for key, value in vars(measured).items() if key != "variant"}, result_file)


def bench_in_fresh_process(variant: Variant, *args: Any) -> Measured:
    """bench_variant in a spawned process: megatron's process groups are per process, and the GPUs start empty."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = str(Path(tmp) / "measured.pt")
        child = multiprocessing.get_context("spawn").Process(target=_bench_in_child,
                                                             args=(result_file, variant, *args))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"{variant.label} failed (exit code {child.exitcode}); its traceback is above")
        return Measured(variant=variant, **torch.load(result_file, weights_only=False))


def step_flops(shape: dict[str, Any], batch: int, length: int, lora_rank: int) -> float:
    """Model FLOPs of one LoRA training step (module docstring)."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    q, kv, ffn = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim, \
        shape["intermediate_size"]
    tokens = batch * length
    base = layers * linear_params(shape) + shape["vocab_size"] * hidden
    # LoRA A [r, in] and B [out, r] on q, k, v, o, gate, up, down
    lora = layers * lora_rank * ((hidden + q) + 2 * (hidden + kv) + (q + hidden) + 3 * (hidden + ffn))
    attention = layers * batch * 2 * length * length * q
    return 4 * base * tokens + 6 * lora * tokens + 3 * attention


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tflops for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), None)


def print_results(title: str, results: list[Measured], flops: float, peak: float | None) -> None:
    """One table: throughput vs the first variant, scaling vs Megatron TP=1 / TP=2 of the same settings (tok/s
    ratio, and per GPU), MFU, peak memory of the fullest GPU."""
    first = results[0].row
    by_tp = {(m.variant.tp, m.variant.checkpointing): m.row for m in results if m.variant.backend == "megatron"}
    print(f"\n{title}")
    print("| variant | GPUs | step s | tok/s | vs first | vs TP=1 (per GPU) | vs TP=2 (per GPU) | MFU | peak GiB/GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in results:
        row, gpus = m.row, m.variant.tp if m.variant.backend == "megatron" else 1
        scaling = []
        for base_tp in (1, 2):
            base = by_tp.get((base_tp, m.variant.checkpointing))
            if m.variant.backend != "megatron" or base is None or base_tp > gpus:
                scaling.append("")
                continue
            speedup = row.tok_s / base.tok_s
            scaling.append(f"{speedup:.2f}x ({speedup * base_tp / gpus:.0%})")
        mfu = f"{flops / (row.median_s * gpus * peak * 1e12):.1%}" if peak else "n/a"
        print(f"| {row.name} | {gpus} | {row.median_s:.3f} | {row.tok_s:,.0f} | {row.tok_s / first.tok_s:.2f}x | "
              f"{scaling[0]} | {scaling[1]} | {mfu} | {row.peak_gib:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,llama-8b")
    parser.add_argument("--backends", default="hf,megatron")
    parser.add_argument("--tensor-parallel", "--tp", default="1",
                        help="tensor-parallel sizes of the Megatron backend, e.g. 1,2,4,8 (one run each)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=str, default="", help="BxT overriding the shape's default, e.g. 4x1024")
    parser.add_argument("--checkpointing", default="off", help="activation checkpointing per backend: off, on "
                        "or off,on (each setting loads the backend anew)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak bf16 dense TFLOP/s of one GPU for MFU (default: known for H100 / H200)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tinker-bus-bench"))
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpus else 'CPU'} x {gpus}, "
          f"LoRA r={args.rank} on q/k/v/o/gate/up/down, cross_entropy, AdamW")
    settings = [setting == "on" for setting in args.checkpointing.split(",")]
    tp_sizes = [int(tp) for tp in args.tensor_parallel.split(",")]
    variants = [Variant(name, tp, checkpointing) for name in args.backends.split(",") for checkpointing in settings
                for tp in (tp_sizes if name == "megatron" else [1])]
    for shape_name in args.shapes.split(","):
        batch, length = (map(int, args.batch.split("x")) if args.batch else DEFAULT_BATCH[shape_name])
        model_dir = build_model_dir(shape_name, args.workdir / shape_name)
        if gpus:
            torch.cuda.empty_cache()  # the variants run in child processes: leave them the GPUs
        results = [bench_in_fresh_process(variant, model_dir, batch, length, args) for variant in variants]
        reference = results[0].first_logprobs
        print_results(f"{shape_name}: {batch} x {length} tokens per step", results,
                      step_flops(SHAPES[shape_name], batch, length, args.rank), peak_tflops(args))
        for m in results:
            print(f"  {m.row.name:<24} load {m.load_s:6.1f} s   first loss:sum {m.first_loss:.6g}   "
                  f"max |logprob - {results[0].row.name}| {np.abs(m.first_logprobs - reference).max():.3g}   "
                  f"peak GiB per GPU {', '.join(f'{gib:.2f}' for gib in m.peak_per_gpu)}")


if __name__ == "__main__":
    main()
