"""Tensors on the wire: raw little-endian bytes + dtype + shape. Never pickle."""

from __future__ import annotations

import math

import msgspec
import numpy as np

WIRE_DTYPES: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


class Tensor(msgspec.Struct, forbid_unknown_fields=True):
    """A dense tensor: `data` holds prod(shape) elements of `dtype`, little-endian, row-major."""

    dtype: str
    shape: list[int]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise msgspec.ValidationError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise msgspec.ValidationError(f"shape has a negative dimension: {self.shape}")
        expected = math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize
        if len(self.data) != expected:
            raise msgspec.ValidationError(
                f"data holds {len(self.data)} bytes, but shape {self.shape} of {self.dtype} needs {expected}"
            )

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=WIRE_DTYPES[self.dtype]).reshape(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_from_numpy(array: np.ndarray | list, dtype: str | None = None) -> Tensor:
    """Build a wire Tensor; `dtype` defaults to the array's own (which must be a wire dtype)."""
    arr = np.asarray(array)
    name = dtype or arr.dtype.name
    if name not in WIRE_DTYPES:
        raise ValueError(f"cannot send dtype {arr.dtype} on the wire; use one of {sorted(WIRE_DTYPES)}")
    arr = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[name])
    return Tensor(dtype=name, shape=list(arr.shape), data=arr.tobytes())


def token_ids_tensor(ids: np.ndarray) -> Tensor:
    """Integer token ids as int32 when they all fit (any vocabulary's do): an 8 x 2048 step's target_tokens are then
    a quarter of its bytes less for the broker to write and the trainer to read. Ids that do not fit stay int64, so
    a check sees them as sent, never wrapped into a valid id."""
    narrow = ids.astype("<i4")
    fits = bool(np.array_equal(narrow, ids))
    return tensor_from_numpy(narrow if fits else ids, "int32" if fits else "int64")
