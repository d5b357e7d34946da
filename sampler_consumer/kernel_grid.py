"""How wide to launch the sampler's Triton kernels: the device's SM count, the one input besides tensor shapes that
their grids depend on (so a captured CUDA graph's grid never changes)."""

from __future__ import annotations

import functools

import torch

# Without a GPU the kernels run in Triton's interpreter, one program after another: a small GPU's worth keeps the
# CPU tests quick while still splitting small batches (the kernel tests also force every split count).
INTERPRETER_SMS = 8


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
