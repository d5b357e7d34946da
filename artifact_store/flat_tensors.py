"""Tensors that already are a safetensors file: one buffer holding the header and every tensor's bytes, the
tensors being views into it. A writer fills the views (a device -> host copy straight into the file's bytes) and
hands the file on as a memoryview: no serialisation pass, no copy of the payload under the GIL.

The file is a standard safetensors file (8-byte little-endian header length, JSON header padded with spaces to a
multiple of 8, then the data with no gaps), so every safetensors / PEFT reader loads it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads with the first buffer: the gateway imports artifact_store without torch
    import torch

_DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class FlatTensors(dict):
    """name -> tensor view into `buffer`, which holds the whole safetensors file (see `file`)."""

    buffer: torch.Tensor  # uint8 [file size]

    @classmethod
    def allocate(cls, layout: Mapping[str, tuple[torch.Size, torch.dtype]], *, pin: bool = False) -> FlatTensors:
        """Empty tensors of these shapes and dtypes, laid out as one safetensors file (`pin`: page-locked host
        memory, the target of asynchronous device copies)."""
        import torch

        # Wider dtypes first (safetensors' own order): every view then starts at a multiple of its element size.
        order = sorted(layout, key=lambda name: -layout[name][1].itemsize)
        header: dict[str, dict] = {}
        offset = 0
        for name in order:
            shape, dtype = layout[name]
            dtype_name = str(dtype).removeprefix("torch.")
            if dtype_name not in _DTYPE_NAMES:
                raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
            size = shape.numel() * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype_name], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        start = 8 + len(encoded)
        buffer = torch.empty(start + offset, dtype=torch.uint8, pin_memory=pin)
        prefix = struct.pack("<Q", len(encoded)) + encoded
        buffer[:start] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        out = cls()
        out.buffer = buffer
        for name in layout:  # the caller's order
            shape, dtype = layout[name]
            begin, end = header[name]["data_offsets"]
            out[name] = buffer[start + begin:start + end].view(dtype).view(shape)
        return out

    def file(self) -> memoryview:
        """The safetensors file: a view of the buffer, valid as long as this object lives."""
        return self.buffer.numpy().data.cast("B")
