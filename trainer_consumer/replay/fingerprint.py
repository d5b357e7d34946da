"""A sha256 of adapter weights that does not depend on how they were stored.

Two files with the same tensors can differ byte for byte (safetensors header order, metadata), so replay reports
and tests compare this digest instead: for each tensor in name order, a length-prefixed JSON header
{"name", "dtype", "shape"} and then its raw row-major bytes (length-prefixed), all little-endian.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

DOMAIN = b"tinker-bus adapter sha256 v1\0"


def adapter_sha256(weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(DOMAIN)
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        header = json.dumps({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
                             "shape": list(tensor.shape)}, sort_keys=True).encode()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()  # x86 / ARM: little-endian
        for part in (header, data):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()
