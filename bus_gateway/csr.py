"""Sparse CSR tensors of the SDK's TensorData (JSON `sparse_crow_indices` / `sparse_col_indices`, protobuf
`SparseCsr`): checked and densified on the way in, built from a mask of listed cells on the way out."""

from __future__ import annotations

import numpy as np

from bus_gateway.errors import FieldError


def csr_to_dense(values: np.ndarray, crow: np.ndarray, cols: np.ndarray, shape: list[int], where: str,
                 pad: float = 0) -> np.ndarray:
    """The dense [rows, width] array with `values` at the listed cells and `pad` elsewhere."""
    if len(shape) != 2:
        raise FieldError(f"{where}.shape", f"a sparse CSR tensor needs a 2-D shape, got {shape}")
    rows, width = shape
    if (crow.size != rows + 1 or cols.size != values.size or (crow.size and (crow[0] != 0 or crow[-1] != values.size))
            or np.any(np.diff(crow) < 0) or np.any((cols < 0) | (cols >= width))):
        raise FieldError(f"{where}.sparse_csr", "inconsistent CSR indices for shape " + str(shape))
    dense = np.full(shape, pad, dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), cols] = values
    return dense


def dense_to_csr(dense: np.ndarray, listed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, crow_indices int64, col_indices int64) of the cells of 2-D `dense` where `listed` is true."""
    rows, cols = np.nonzero(listed)  # row-major order, as CSR lists them
    crow = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=crow[1:])
    return dense[rows, cols], crow, cols.astype(np.int64)
