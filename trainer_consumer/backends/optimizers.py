"""The optimizer families a model can be created with (bus_events OptimizerSpec.type) and their per-adapter
optimizers: every backend that trains PEFT-named parameters builds its adapters' optimizers here."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bus_events import payloads as p
from trainer_consumer.backends.adamw import AdapterOptimizer
from trainer_consumer.backends.base import BackendInputError
from trainer_consumer.backends.dimuon import DimuonOptimizer

AnyOptimizer = AdapterOptimizer | DimuonOptimizer
_FAMILIES: dict[str, type[AnyOptimizer]] = {"adamw": AdapterOptimizer, "dimuon": DimuonOptimizer}


def make_optimizer(family: str, params: Mapping[str, torch.nn.Parameter]) -> AnyOptimizer:
    if family not in _FAMILIES:
        raise BackendInputError(f"optimizer {family!r} is not one of {sorted(_FAMILIES)}")
    return _FAMILIES[family](params)


def step(optimizer: AnyOptimizer, params: p.AdamParams | p.DimuonParams) -> dict[str, float]:
    """One step with the parameters of the optimizer's own family (the engine checks the family first)."""
    if isinstance(optimizer, DimuonOptimizer) and isinstance(params, p.DimuonParams):
        return optimizer.step(params)
    if isinstance(optimizer, AdapterOptimizer) and isinstance(params, p.AdamParams):
        return optimizer.step(params)
    raise BackendInputError(f"a {type(params).__name__} step for a {type(optimizer).__name__}")
