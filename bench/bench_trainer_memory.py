"""Peak memory and speed of one training step: the HF + PEFT trainer backend vs a bare PEFT loop.

The bare loop goes through the model's own `labels` path, which materialises the [B, T, V] logits (and their fp32
copy for the loss); the backend computes log p(target) in checkpointed chunks of positions, so the logits of at
most `logprob_chunk_tokens` positions exist at once. Variants: the backend as configured by default, with
activation checkpointing, and with small micro-batches (the two-pass path). Random weights from bench/shapes.py.

    python -m bench.bench_trainer_memory --shape llama-1b --batch 8x2048     # GPU (vocab 128256)
    python -m bench.bench_trainer_memory --shape tiny --batch 2x64 --steps 2  # CPU smoke run

Measured (H100 80GB, torch 2.11, llama-1b geometry, vocab 128256, 8 x 2048 tokens, --steps 3 --warmup 1):

    variant                           tok/s   vs bare   peak GiB
    bare PEFT (labels, full logits)   32859    1.000x      68.77
    backend (chunked logprobs)        28642    0.872x      43.45
    backend + activation ckpt         21706    0.661x       6.91
    backend, micro-batch 2048 tok     11947    0.364x       9.52
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np
import torch

from bench.bare_peft import make_bare_step
from bench.data import random_datums
from bench.shapes import build_model_dir
from bench.timing import Row, peak_gib, print_table, reset_peak, timed_steps
from bus_events import payloads as p
from bus_events.payloads import LoraSpec
from trainer_consumer.backends.base import AdapterSpec
from trainer_consumer.backends.hf_peft import HfPeftBackend

ADAM = p.AdamParams(learning_rate=1e-5)


def bench_backend(name: str, model_dir: Path, batch: int, length: int, args: argparse.Namespace,
                  **backend_options: object) -> Row:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = HfPeftBackend(**backend_options)  # type: ignore[arg-type]
    info = backend.base_model_info(str(model_dir))
    backend.create_adapter("bench", AdapterSpec(str(model_dir), LoraSpec(rank=args.rank, seed=0, train_unembed=False)))
    data = random_datums(batch, length, info.vocab_size)
    reset_peak(device)

    def step() -> None:
        backend.forward_backward("bench", data, "cross_entropy", {}, forward_only=False)
        backend.optim_step("bench", ADAM)

    times = timed_steps(step, args.steps, args.warmup, device)
    return Row(name, batch * length, times, peak_gib(device))


def bench_bare(model_dir: Path, batch: int, length: int, args: argparse.Namespace) -> Row:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = int(__import__("json").loads((model_dir / "config.json").read_text())["vocab_size"])
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (batch, length)))
    _, step = make_bare_step(model_dir, device, tokens, rank=args.rank)
    reset_peak(device)
    times = timed_steps(step, args.steps, args.warmup, device)
    return Row("bare PEFT (labels, full logits)", batch * length, times, peak_gib(device))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--batch", default="8x2048", help="B x T tokens per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tinker-bus-bench"))
    args = parser.parse_args()
    batch, length = map(int, args.batch.split("x"))
    model_dir = build_model_dir(args.shape, args.workdir / args.shape)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, {device}, LoRA r={args.rank} on q/k/v/o/gate/up/down, cross_entropy + AdamW")
    rows = [bench_bare(model_dir, batch, length, args)]
    _free()
    variants = [("backend (chunked logprobs)", {}),
                ("backend + activation ckpt", {"gradient_checkpointing": True}),
                (f"backend, micro-batch {length} tok", {"micro_batch_tokens": length})]
    for name, options in variants:
        rows.append(bench_backend(name, model_dir, batch, length, args, **options))
        _free()
    print_table(f"{args.shape}: {batch} x {length} tokens per step", rows, baseline=rows[0].name)


if __name__ == "__main__":
    main()
