"""What every backend keeps the same way: its base models by name (loaded on first use) and its adapters by
model_id, and the check that a checkpoint's tensors fit an adapter before anything is overwritten."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

import torch

from trainer_consumer.backends.base import BackendInputError, UnknownModel

B = TypeVar("B")
A = TypeVar("A")


class AdapterRegistry(Generic[B, A]):
    def __init__(self, load_base: Callable[[str], B]):
        self._load_base = load_base
        self.bases: dict[str, B] = {}
        self.adapters: dict[str, A] = {}

    def base(self, name: str) -> B:
        if name not in self.bases:
            self.bases[name] = self._load_base(name)
        return self.bases[name]

    def adapter(self, model_id: str) -> A:
        try:
            return self.adapters[model_id]
        except KeyError:
            raise UnknownModel(f"no adapter is loaded for model {model_id!r}") from None

    def check_new(self, model_id: str) -> None:
        if model_id in self.adapters:
            raise BackendInputError(f"model {model_id!r} already has an adapter")

    def add(self, model_id: str, adapter: A) -> None:
        self.check_new(model_id)
        self.adapters[model_id] = adapter

    def pop(self, model_id: str) -> A | None:
        return self.adapters.pop(model_id, None)


def check_adapter_weights(shapes: Mapping[str, list[int]], weights: Mapping[str, torch.Tensor]) -> None:
    """`weights` (full PEFT tensors) has exactly the adapter's names, each with its full shape."""
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes))
    if missing or unexpected:
        raise BackendInputError(f"adapter weights do not match the adapter: missing {missing[:3]}"
                                f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                                f"{'...' if len(unexpected) > 3 else ''}")
    for key, shape in shapes.items():
        if list(weights[key].shape) != list(shape):
            raise BackendInputError(f"adapter weight {key} has shape {list(weights[key].shape)}, "
                                    f"the adapter needs {list(shape)}")
