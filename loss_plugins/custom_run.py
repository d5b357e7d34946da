"""Running a checked custom loss (custom_graph.py): its nodes one by one, each a function or tensor method from the
closed lists there, datum by datum as the SDK's client-side run_loss_handle does (the per-datum losses are summed;
`:sum` metrics are summed and `:mean` metrics averaged over the datums)."""

from __future__ import annotations

import contextlib
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


class _DataDependent(Exception):
    """The meta device cannot follow the graph past a node whose output shape depends on values."""


def _scalar_operands(target: str, call_args: list[Any]) -> list[Any]:
    """Python operators on plain values: numbers only (no string or list repetition), and pow in floating point
    (an integer power of an integer can take any time)."""
    if target == "operator.getitem" or any(isinstance(a, torch.Tensor) for a in call_args):
        return call_args
    if not all(isinstance(a, (int, float)) for a in call_args):
        raise LossInputError(f"{target} on {[type(a).__name__ for a in call_args]}: operators take tensors or numbers")
    return [float(a) for a in call_args] if target == "operator.pow" else call_args


def _call(node: Mapping[str, Any], call_args: list[Any], kwargs: dict[str, Any]) -> Any:
    op, target = node["op"], node["target"]
    if op == "call_function":
        if target.startswith(("operator.", "math.")):
            call_args = _scalar_operands(target, call_args)
        return _function(target)(*call_args, **kwargs)
    receiver, *rest = call_args
    if not isinstance(receiver, torch.Tensor) or target not in METHODS:
        raise CustomLossError(f"graph node {node['name']!r}", f"method {target!r} needs a tensor")
    return getattr(receiver, target)(*rest, **kwargs)


def _run_graph(loss: CustomLoss, args: Sequence[torch.Tensor], limit: int) -> Any:
    """The graph's output for one datum. No tensor may exceed `limit` elements and no integer 2**63 in magnitude;
    an operation that fails is the loss's error (a "user" error naming the node), never the trainer's."""
    env: dict[str, Any] = {}
    placeholders = iter(args)
    meta = args[0].device.type == "meta"
    for node in loss.nodes:
        name = node["name"]
        if node["op"] == "placeholder":
            env[name] = next(placeholders)
            continue
        call_args = _decode(node.get("args", []), env)
        if node["op"] == "output":
            return call_args[0]
        kwargs = {key: _decode(value, env) for key, value in node.get("kwargs", {}).items()}
        try:
            value = _call(node, call_args, kwargs)
        except (LossInputError, CustomLossError):
            raise
        except (NotImplementedError, RuntimeError) as exc:
            if meta:  # e.g. boolean-mask indexing: its size is known only on real data, checked there
                raise _DataDependent(name) from exc
            raise LossInputError(f"custom loss {loss.name!r}: node {name!r} ({node['target']}) failed: {exc}") from exc
        except (ArithmeticError, TypeError, ValueError, IndexError, KeyError) as exc:
            raise LossInputError(f"custom loss {loss.name!r}: node {name!r} ({node['target']}) failed: {exc}") from exc
        if isinstance(value, torch.Tensor) and value.numel() > limit:
            raise LossInputError(f"custom loss {loss.name!r}: node {name!r} would hold {value.numel()} elements, "
                                 f"more than {limit} ({GROWTH_LIMIT}x the datum's inputs)")
        if isinstance(value, int) and abs(value) > 2**63:
            raise LossInputError(f"custom loss {loss.name!r}: node {name!r} computes an integer beyond 2**63")
        env[name] = value
    raise CustomLossError("graph.nodes", "has no output node")


def _limit(args: Sequence[torch.Tensor]) -> int:
    return GROWTH_FLOOR + GROWTH_LIMIT * sum(a.numel() for a in args)


def _check_growth(loss: CustomLoss, args: Sequence[torch.Tensor]) -> None:
    """Run the graph on the meta device (shapes only, nothing allocated) to stop a blow-up before it happens."""
    meta = [torch.empty(a.shape, dtype=a.dtype, device="meta") for a in args]
    # Past a data-dependent shape the real run checks each tensor as it is made.
    with contextlib.suppress(_DataDependent):
        _run_graph(loss, meta, _limit(args))


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
        out = _run_graph(loss, args, _limit(args))
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
