"""Compile the sampler's Triton kernels for sm_90 (H100 / H200) without a GPU, specialised as a launch on the
engine's shapes would be (16-byte aligned pointers; strides and feature counts marked as multiples of 16), and
print one line per kernel: spilled bytes (cuobjdump's LOCAL) and how many asynchronous copies Triton's software
pipeliner put into its loops. Run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled):

    python tests/kernel_compile_check.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sampler_consumer import attention, lora_kernels

# Pointer arguments that are not the model dtype (bf16).
_INT32_POINTERS = {"table_ptr", "lens_ptr", "tiles_ptr"}
_FP32_POINTERS = {"part_ptr", "lse_ptr"}
_DIVISIBLE = re.compile(r"^(stride_|in_features$|out_features$|width$|span$)")

_DECODE = dict(GROUP=4, GROUP_PAD=16, PAGE=16, BLOCK_T=64, PRECISION="tf32")
_LORA = dict(RANK=32, TILE=16, PRECISION="tf32")
KERNELS = [  # (label, kernel, constexprs, pointer dtype overrides)
    ("decode 1B", attention._paged_decode, dict(_DECODE, HEAD_DIM=64, SPLIT=False), {}),
    ("decode 8B", attention._paged_decode, dict(_DECODE, HEAD_DIM=128, SPLIT=False), {}),
    ("decode 8B split", attention._paged_decode, dict(_DECODE, HEAD_DIM=128, SPLIT=True), {"out_ptr": "*fp32"}),
    ("combine 8B", attention._combine, dict(HEAD_DIM=128, SPLITS_PAD=16, BLOCK_T=64), {}),
    ("lora shrink", lora_kernels._shrink, dict(_LORA, BLOCK_K=64), {}),
    ("lora expand", lora_kernels._expand, dict(_LORA, BLOCK_N=64), {}),
]


def signature(kernel, constexprs: dict, pointers: dict[str, str]) -> tuple[dict[str, str], dict]:
    types, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = pointers.get(name) or ("*i32" if name in _INT32_POINTERS else
                                                 "*fp32" if name in _FP32_POINTERS else "*bf16")
        else:
            types[name] = "fp32" if name == "scale" else "i32"
        if name.endswith("_ptr") or _DIVISIBLE.match(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return types, attrs


def main() -> None:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for label, kernel, constexprs, pointers in KERNELS:
        types, attrs = signature(kernel, constexprs, pointers)
        compiled = triton.compile(ASTSource(kernel, types, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            Path(cubin).write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "-res-usage", cubin], capture_output=True, text=True,
                                   check=True).stdout
        spilled = re.search(r"LOCAL:(\d+)", usage)
        registers = re.search(r"REG:(\d+)", usage)
        print(f"{label}: spilled {spilled[1] if spilled else '?'} registers {registers[1] if registers else '?'} "
              f"async_copies {compiled.asm['ttgir'].count('async_copy_global_to_local')}", flush=True)


if __name__ == "__main__":
    main()
