"""Copying an adapter's tensors to the host for a checkpoint or snapshot without stalling the compute thread.

One page-locked buffer laid out as the safetensors file itself (artifact_store.FlatTensors), filled by
non-blocking device -> host copies queued behind the step that produced the tensors, then ONE wait. The old way
(`.to("cpu")` per tensor: a blocking copy from pageable memory each, hundreds of them per adapter, then a
serialisation pass on the I/O thread that held the GIL) cost the compute thread ~17 % of its samples in a
pipelined run (docs/benchmarks.md, issue 14). The upload then sends the buffer as is.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from artifact_store.flat_tensors import FlatTensors


def to_host(tensors: Mapping[str, torch.Tensor]) -> FlatTensors:
    """CPU copies of `tensors` (later steps never change them), views into one safetensors-file buffer."""
    devices = {t.device for t in tensors.values() if t.device.type == "cuda"}
    out = FlatTensors.allocate({name: (t.shape, t.dtype) for name, t in tensors.items()}, pin=bool(devices))
    for name, tensor in tensors.items():
        out[name].copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
    for device in devices:  # the copies sit on each device's current stream, behind the kernels that wrote them
        torch.cuda.current_stream(device).synchronize()
    return out


def reserve_host(tensors: Mapping[str, torch.Tensor]) -> None:
    """Page-lock host memory for one snapshot of an adapter whose weights are `tensors` (its buffer, and the
    optimizer's of twice the size) and hand it straight back to torch's pinned caching allocator, which keeps the
    blocks: the adapter's first snapshot then reuses them instead of calling cudaHostAlloc on the compute thread in
    the middle of a run (13 % of the submitted-ahead samples, docs/benchmarks.md, issue 14). Called at creation."""
    if not any(t.device.type == "cuda" for t in tensors.values()):
        return
    weights = {name: (t.shape, t.dtype) for name, t in tensors.items()}
    moments = {f"{name}.{moment}": (t.shape, t.dtype) for name, t in tensors.items()
               for moment in ("exp_avg", "exp_avg_sq")}
    moments.update({f"{name}.step": (torch.Size([]), torch.float32) for name in tensors})
    held = [FlatTensors.allocate(weights, pin=True), FlatTensors.allocate(moments, pin=True)]
    del held
