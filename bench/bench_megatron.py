"""Megatron backend vs HF + PEFT backend: one LoRA training step (forward_backward + optim_step) per backend.

Self-contained on the GPU box: random bf16 weights from a shape in bench/shapes.py are saved once to --workdir,
then each backend loads that folder through its normal path, so both train the very same model. Prints one
table per shape, plus each backend's first-step loss and the largest logprob difference to the first backend.

    pip install --no-deps .whl/megatron_core-0.19.2-*.whl   # the GPU box has no megatron-core
    python -m bench.bench_megatron --shapes llama-1b,llama-8b             # 1 GPU: HF vs Megatron TP=1
    python -m bench.bench_megatron --shapes llama-8b --tp 2 --backends megatron   # 2 GPUs
    python -m bench.bench_megatron --shapes llama-8b --checkpointing off,on   # activation checkpointing's cost
    python -m bench.bench_megatron --shapes tiny --steps 2                # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import numpy as np
import torch

from bench.data import random_datums
from bench.shapes import DEFAULT_BATCH, build_model_dir
from bench.timing import Row, peak_gib, print_table, reset_peak, timed_steps
from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from trainer_consumer.backends.base import AdapterSpec

ADAM = p.AdamParams(learning_rate=1e-5)


def make_backend(name: str, tp: int, checkpointing: bool):
    if name == "hf":
        from trainer_consumer.backends.hf_peft import HfPeftBackend

        return HfPeftBackend(gradient_checkpointing=checkpointing)
    from trainer_consumer.backends.megatron.backend import MegatronBackend

    return MegatronBackend(tp_size=tp, gradient_checkpointing=checkpointing)


def bench_backend(name: str, tp: int, model_dir: Path, batch: int, length: int, args: argparse.Namespace,
                  checkpointing: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reset_peak(device)
    backend = make_backend(name, tp, checkpointing)
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
    label = (f"{name} (TP={tp})" if name == "megatron" else name) + (" + act. ckpt" if checkpointing else "")
    row = Row(label, batch * length, times, peak_gib(device))
    print(f"  measured {label}: median step {row.median_s:.3f} s, peak {row.peak_gib:.2f} GiB", flush=True)
    if hasattr(backend, "close"):
        backend.close()
    return row, load_s, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-1b,llama-8b")
    parser.add_argument("--backends", default="hf,megatron")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the Megatron backend")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=str, default="", help="BxT overriding the shape's default, e.g. 4x1024")
    parser.add_argument("--checkpointing", default="off", help="activation checkpointing per backend: off, on "
                        "or off,on (each setting loads the backend anew)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tinker-bus-bench"))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"LoRA r={args.rank} on q/k/v/o/gate/up/down, cross_entropy, AdamW")
    for shape in args.shapes.split(","):
        batch, length = (map(int, args.batch.split("x")) if args.batch else DEFAULT_BATCH[shape])
        model_dir = build_model_dir(shape, args.workdir / shape)
        rows, notes, reference = [], [], None
        settings = [setting == "on" for setting in args.checkpointing.split(",")]
        runs = [(name, checkpointing) for name in args.backends.split(",") for checkpointing in settings]
        for name, checkpointing in runs:
            row, load_s, first = bench_backend(name, args.tp, model_dir, batch, length, args, checkpointing)
            gc.collect()  # the backend (and its model) went out of scope: free it before the next one loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            rows.append(row)
            flat = np.concatenate(first.logprobs)
            reference = flat if reference is None else reference
            notes.append(f"  {row.name:<18} load {load_s:6.1f} s   first loss:sum {first.metrics['loss:sum']:.6g}   "
                         f"max |logprob - {rows[0].name}| {np.abs(flat - reference).max():.3g}")
        print_table(f"{shape}: {batch} x {length} tokens per step", rows, baseline=rows[0].name)
        print("\n".join(notes))


if __name__ == "__main__":
    main()
