"""Random training batches shared by the benchmarks: next-token datums over random token ids."""

from __future__ import annotations

import numpy as np

from bus_events import payloads as p
from bus_events import tensor_from_numpy


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """int64 [batch, length + 1]: each row is one sequence; datums predict row[1:] from row[:-1]."""
    return np.random.default_rng(seed).integers(3, vocab, (batch, length + 1))


def datums_from_tokens(tokens: np.ndarray) -> list[p.Datum]:
    return [p.Datum(tokens=tensor_from_numpy(row[:-1], "int32"), loss_fn_inputs={
        "target_tokens": tensor_from_numpy(row[1:], "int64"),
        "weights": tensor_from_numpy(np.ones(len(row) - 1), "float32")}) for row in tokens]


def random_datums(batch: int, length: int, vocab: int, seed: int = 0) -> list[p.Datum]:
    return datums_from_tokens(random_tokens(batch, length, vocab, seed))
