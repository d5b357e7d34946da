"""Process groups for megatron-core, the CPU shim, and sharding helpers for tensor parallelism (TP).

megatron-core keeps its process groups in module-level state (`parallel_state`), so one process hosts at most
one Megatron TP group: rank 0 is the trainer process, ranks 1..N-1 are workers it spawns (backend.py).
On CPU (tests) the groups run over gloo; on GPU over NCCL, with gloo kept for the control plane.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

_shim_applied = False
T = TypeVar("T")


def _cpu_device() -> torch.device:
    return torch.device("cpu")


def apply_cpu_shim() -> None:
    """megatron-core asks torch.cuda for the current device in RoPE, its RNG tracker and buffers; on a CPU-only
    torch that raises "Torch not compiled with CUDA enabled". Answer "cpu" instead (idempotent, CPU only)."""
    global _shim_applied
    if _shim_applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]  # a device where torch expects an index
    from megatron.core import tensor_parallel

    # The tracker forks CUDA RNG states to give TP ranks different dropout masks; dropout is off here.
    tensor_parallel.random.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    _shim_applied = True


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


_control_group: dist.ProcessGroup | None = None


def init_tensor_parallel(rank: int, world_size: int, init_method: str, seed: int = 1234) -> None:
    """Join the process group and build megatron's TP groups: world_size-way TP, no PP/CP/DP. Idempotent for the
    same world size (several backends in one test process share the groups)."""
    global _control_group
    apply_cpu_shim()
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        if tp_size() != world_size:
            raise RuntimeError(f"this process already runs TP={tp_size()}; cannot also run TP={world_size}")
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30))
    # Commands and their (pickled) arguments travel on CPU, whatever carries the tensors.
    _control_group = dist.new_group(backend="gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def control_group() -> dist.ProcessGroup:
    if _control_group is None:
        raise RuntimeError("init_tensor_parallel() has not run in this process")
    return _control_group


def destroy_tensor_parallel() -> None:
    global _control_group
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _control_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank's contiguous slice of `full` along `dim`, zero-padded at the end when `size` does not divide it
    (the padded vocabulary of the unembedding)."""
    length = full.shape[dim]
    per_rank = -(-length // size)
    start = min(rank * per_rank, length)
    piece = full.narrow(dim, start, min(per_rank, length - start))
    missing = per_rank - piece.shape[dim]
    if missing:
        pad_shape = list(piece.shape)
        pad_shape[dim] = missing
        piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=dim)
    return piece.contiguous()


def gather(local: torch.Tensor, dim: int, full_length: int) -> torch.Tensor:
    """Inverse of `shard` across the TP group: concatenate every rank's slice and drop the padding."""
    size = tp_size()
    if size == 1:
        return local.narrow(dim, 0, full_length)
    from megatron.core import parallel_state

    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(pieces, dim=dim).narrow(dim, 0, full_length)


def sum_over_tp(value: torch.Tensor) -> torch.Tensor:
    if tp_size() == 1:
        return value
    from megatron.core import parallel_state

    value = value.clone()
    dist.all_reduce(value, group=parallel_state.get_tensor_model_parallel_group())
    return value


def all_gather_object(value: T) -> list[T]:
    """Every TP rank's `value` (picklable, small), in rank order, on every rank (over the gloo control group)."""
    if tp_size() == 1:
        return [value]
    out: list[Any] = [None] * tp_size()
    dist.all_gather_object(out, value, group=control_group())
    return out


def free_tcp_init_method() -> str:
    from bus_runtime.net import free_port

    return f"tcp://127.0.0.1:{free_port()}"

