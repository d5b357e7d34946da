"""Running a checked custom loss (custom_graph.py): its nodes one by one, each a function or tensor method from the
closed lists there, datum by datum as the SDK's client-side run_loss_handle does (the per-datum losses are summed;
`:sum` metrics are summed and `:mean` metrics averaged over the datums)."""

from __future__ import annotations

import functools
import importlib
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from loss_plugins.custom_graph import FUNCTIONS, METHODS, CustomLoss, CustomLossError
from loss_plugins.spec import DATUM_INDEX, LossInputError, LossOutput

# No intermediate tensor may hold more elements than this many times the datum's input elements (plus a small
# floor): a graph cannot outer-product a long sequence with itself into device memory. Checked on the "meta"
# device, which computes shapes only, before anything is allocated.
GROWTH_LIMIT = 64
GROWTH_FLOOR = 1 << 16


@functools.cache
def _function(name: str) -> Callable[..., Any]:
    """The callable an allowed name stands for: `name` is on custom_graph.FUNCTIONS, never a tenant's own text."""
    if name not in FUNCTIONS:
        raise CustomLossError("target", f"function {name!r} is not allowed")
    if name == "getattr":
        return getattr
    module_name, _, attr = name.rpartition(".")
    roots = {"torch": torch, "math": math, "operator": operator}
    root, *rest = module_name.split(".")
    target: Any = roots[root] if root in roots else importlib.import_module(root)
    for part in rest:
        target = getattr(target, part)
    return getattr(target, attr)


def _decode(value: Any, env: Mapping[str, Any]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    (kind, inner), = value.items()
    if kind == "ref":
        return env[inner]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in inner)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    if kind == "slice":
        return slice(*(_decode(v, env) for v in inner))
    if kind == "float":
        return float(inner)
    if kind == "ellipsis":
        return Ellipsis
    return getattr(torch, inner)  # "dtype": one of custom_graph.DTYPES


def _run_graph(loss: CustomLoss, args: Sequence[torch.Tensor], limit: int | None = None) -> Any:
    env: dict[str, Any] = {}
    placeholders = iter(args)
    for node in loss.nodes:
        op, target = node["op"], node["target"]
        if op == "placeholder":
            env[node["name"]] = next(placeholders)
            continue
        call_args = _decode(node.get("args", []), env)
        kwargs = {key: _decode(value, env) for key, value in node.get("kwargs", {}).items()}
        if op == "output":
            return call_args[0]
        if op == "call_function":
            value = _function(target)(*call_args, **kwargs)
        else:
            receiver, *rest = call_args
            if not isinstance(receiver, torch.Tensor) or target not in METHODS:
                raise CustomLossError(f"graph node {node['name']!r}", f"method {target!r} needs a tensor")
            value = getattr(receiver, target)(*rest, **kwargs)
        if limit is not None and isinstance(value, torch.Tensor) and value.numel() > limit:
            raise LossInputError(f"custom loss {loss.name!r}: node {node['name']!r} would hold {value.numel()} "
                                 f"elements, more than {limit} ({GROWTH_LIMIT}x the datum's inputs)")
        env[node["name"]] = value
    raise CustomLossError("graph.nodes", "has no output node")


def _check_growth(loss: CustomLoss, args: Sequence[torch.Tensor]) -> None:
    meta = [torch.empty(a.shape, dtype=a.dtype, device="meta") for a in args]
    _run_graph(loss, meta, GROWTH_FLOOR + GROWTH_LIMIT * sum(a.numel() for a in args))


def run_custom_loss(loss: CustomLoss, target_logprobs: torch.Tensor,
                    inputs: Mapping[str, torch.Tensor]) -> LossOutput:
    rank = loss.inputs[0][1]
    if target_logprobs.dim() != rank:
        raise LossInputError(f"custom loss {loss.name!r} declared logprobs with rank {rank}, but target_tokens has "
                             f"rank {target_logprobs.dim()}")
    datum = inputs[DATUM_INDEX]
    counts = torch.bincount(datum.cpu()).tolist() if datum.numel() else []
    columns = [target_logprobs, *(inputs[name] for name, _ in loss.inputs[1:])]
    for (name, declared), column in zip(loss.inputs[1:], columns[1:], strict=True):
        if column.dim() != declared:
            raise LossInputError(f"loss_fn_inputs[{name!r}] has rank {column.dim()}, but custom loss {loss.name!r} "
                                 f"declared it with rank {declared}")
    per_datum = [torch.split(column, counts) for column in columns]
    checked_shapes: set[tuple] = set()
    total: torch.Tensor | None = None
    sums: dict[str, float] = {}
    for args in zip(*per_datum, strict=True):
        shapes = tuple(a.shape for a in args)
        if shapes not in checked_shapes:
            _check_growth(loss, args)
            checked_shapes.add(shapes)
        out = _run_graph(loss, args)
        value, metrics = out
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise LossInputError(f"custom loss {loss.name!r} must return a scalar loss, got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
        total = value if total is None else total + value
        for key, metric in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(metric.detach() if isinstance(metric, torch.Tensor) else metric)
    if total is None:
        raise LossInputError(f"custom loss {loss.name!r} got no datums")
    count = len(counts)
    metrics_out = {key: value / count if key.endswith(":mean") else value for key, value in sums.items()}
    metrics_out["loss:sum"] = float(total.detach())
    return LossOutput(total.to(target_logprobs.dtype), metrics_out)
