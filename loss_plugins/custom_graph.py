"""Server-side custom losses (SDK 0.38 `create_custom_loss`, loss_fn "custom"), torch-free: the traced torch.fx
graph the SDK uploads, checked against a closed list of operations, and described as a LossSpec.

Nothing a tenant sends is ever executed as code. The graph is data: node targets are NAMES, and only names on the
lists below are accepted; custom_run.py maps each to the torch / math / operator function of that name and runs the
nodes one by one. No import, no attribute lookup by a tenant-chosen name outside these lists, no file or network
access: the worst a graph can do is arithmetic on the request's own tensors, and custom_run.py bounds how large
its intermediate tensors may grow. So no operator flag is needed to enable it (docs/events.md, "Custom losses").

The stored form, which the gateway puts into the forward_backward event's loss_fn_config (so the event alone says
what the trainer computes, and a replay recomputes it): {"loss_id": <id>, "graph": <JSON text of
{"name", "inputs": [{"name", "rank"}], "nodes": [...]}>}.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loss_plugins.spec import LossInputError, LossOutput, LossSpec

if TYPE_CHECKING:
    import torch

LOSS_ID = "loss_id"
GRAPH = "graph"
MAX_NODES = 2000
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")  # the SDK's own rule for a custom loss's metrics
_OPS = ("placeholder", "call_function", "call_method", "output")  # get_attr and call_module are never accepted

_TORCH_FUNCTIONS = (
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "cat", "clamp", "clip", "cumsum", "div", "eq",
    "exp", "exp2", "expm1", "full_like", "gather", "ge", "gt", "isfinite", "isnan", "le", "log", "log1p", "log2",
    "log_softmax", "logical_and", "logical_not", "logical_or", "logsumexp", "lt", "masked_fill", "max", "maximum",
    "mean", "min", "minimum", "mul", "nan_to_num", "ne", "neg", "ones_like", "pow", "prod", "reciprocal", "relu",
    "rsqrt", "sigmoid", "sign", "softmax", "sqrt", "square", "squeeze", "stack", "std", "sub", "sum", "tanh",
    "true_divide", "unsqueeze", "var", "where", "zeros_like",
)
_FUNCTIONAL = ("softplus", "logsigmoid", "relu", "softmax", "log_softmax", "sigmoid", "silu", "gelu", "kl_div",
               "mse_loss", "smooth_l1_loss", "huber_loss")
_C_NN = ("softplus", "log_sigmoid", "gelu", "silu", "mse_loss", "smooth_l1_loss", "huber_loss")  # F's C builtins
_OPERATORS = ("abs", "add", "and_", "eq", "floordiv", "ge", "getitem", "gt", "invert", "le", "lt", "mod", "mul", "ne",
              "neg", "or_", "pos", "pow", "sub", "truediv", "xor")
_MATH = ("exp", "log", "log1p", "sqrt", "tanh", "fabs", "floor", "ceil", "pow")
# Every call_function target a graph may name, as torch.fx names it on the wire (F.softplus is recorded as the C
# function it is, torch._C._nn.softplus; Python operators by their `operator` name).
FUNCTIONS: frozenset[str] = frozenset(
    [f"torch.{n}" for n in _TORCH_FUNCTIONS]
    + [f"torch.nn.functional.{n}" for n in _FUNCTIONAL]
    + [f"torch._C._nn.{n}" for n in _C_NN]
    + [f"torch.special.{n}" for n in ("expit", "logit", "log1p", "expm1", "xlogy", "entr")]
    + [f"operator.{n}" for n in _OPERATORS]
    + [f"math.{n}" for n in _MATH]
    + ["getattr"])
# Tensor methods a graph may call: pure functions of the tensor (no in-place, no host copies, no new storage
# beyond the result).
METHODS: frozenset[str] = frozenset((
    "abs", "add", "all", "amax", "amin", "any", "argmax", "argmin", "bool", "clamp", "clip", "contiguous", "cumsum",
    "detach", "dim", "div", "double", "eq", "exp", "expm1", "flatten", "float", "gather", "ge", "gt", "isfinite",
    "isnan", "le", "log", "log1p", "log_softmax", "logsumexp", "long", "lt", "masked_fill", "max", "maximum", "mean",
    "min", "minimum", "mul", "nan_to_num", "ne", "neg", "numel", "permute", "pow", "prod", "reciprocal", "relu",
    "reshape", "rsqrt", "sigmoid", "sign", "size", "softmax", "sqrt", "square", "squeeze", "std", "sub", "sum", "t",
    "tanh", "to", "transpose", "type_as", "unsqueeze", "var", "view", "where",
))
GETATTR_NAMES = frozenset(("shape", "ndim", "dtype"))
DTYPES = frozenset(("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"))


@dataclass(frozen=True)
class CustomLoss:
    """A checked custom loss: its inputs (logprobs first) with their ranks, and its nodes as the SDK encoded them."""

    name: str
    inputs: tuple[tuple[str, int], ...]
    nodes: tuple[Mapping[str, Any], ...]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "inputs": [{"name": n, "rank": r} for n, r in self.inputs],
                           "nodes": list(self.nodes)}, separators=(",", ":"), sort_keys=True)


class CustomLossError(LossInputError):
    """A custom loss that is malformed or uses something outside the lists above; `field` names the bad part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def parse_custom_loss(name: object, inputs: object, graph: object) -> CustomLoss:
    """Check the parts of a CreateCustomLossRequest (JSON values); CustomLossError names the first bad field."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise CustomLossError("name", "must be a non-empty string of at most 200 characters")
    checked_inputs = _check_inputs(inputs)
    if not isinstance(graph, Mapping) or graph.get("format", 1) != 1 or not isinstance(graph.get("nodes"), list):
        raise CustomLossError("graph", "must be {\"format\": 1, \"nodes\": [...]}")
    nodes = graph["nodes"]
    if not nodes or len(nodes) > MAX_NODES:
        raise CustomLossError("graph.nodes", f"must hold 1 to {MAX_NODES} nodes, got {len(nodes)}")
    seen: set[str] = set()
    placeholders: list[str] = []
    for i, node in enumerate(nodes):
        where = f"graph.nodes[{i}]"
        _check_node(where, node, seen)
        if node["op"] == "placeholder":
            placeholders.append(node["target"])
        elif node["op"] == "output" and i != len(nodes) - 1:
            raise CustomLossError(where, "the output node must be the last node")
        seen.add(node["name"])
    if nodes[-1]["op"] != "output":
        raise CustomLossError(f"graph.nodes[{len(nodes) - 1}]", "the last node must be the output node")
    if placeholders != [n for n, _ in checked_inputs]:
        raise CustomLossError("graph.nodes", f"the graph's parameters {placeholders} must be the inputs "
                                             f"{[n for n, _ in checked_inputs]}, in order")
    return CustomLoss(name, checked_inputs, tuple(nodes))


def _check_inputs(inputs: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(inputs, list) or not inputs:
        raise CustomLossError("inputs", "must list the loss's inputs, logprobs first")
    out: list[tuple[str, int]] = []
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise CustomLossError(where, "must be {\"name\", \"rank\"}")
        name, rank = item["name"], item.get("rank")
        if not _INPUT_NAME.fullmatch(name) or name in (n for n, _ in out):
            raise CustomLossError(f"{where}.name", f"{name!r} must be a distinct lowercase identifier")
        if (i == 0) != (name == "logprobs"):
            raise CustomLossError(f"{where}.name", "logprobs must be the first input, and only the first")
        if rank not in (1, 2):
            # Every loss_fn_input travels per position ([N] or [N, K]) on this server's bus; a per-datum scalar
            # input would need a contract of its own.
            raise CustomLossError(f"{where}.rank", f"must be 1 ([T]) or 2 ([T, K]) here, got {rank!r} (rank-0 "
                                                   "inputs are not supported: send them per position)")
        out.append((name, rank))
    if len(out) > 16:
        raise CustomLossError("inputs", f"at most 16 inputs, got {len(out)}")
    return tuple(out)


def _check_node(where: str, node: object, seen: set[str]) -> None:
    if not isinstance(node, Mapping):
        raise CustomLossError(where, "must be an object")
    op, name, target = node.get("op"), node.get("name"), node.get("target")
    if op not in _OPS:
        raise CustomLossError(f"{where}.op", f"{op!r} is not allowed (allowed: {', '.join(_OPS)})")
    if not isinstance(name, str) or not name or name in seen:
        raise CustomLossError(f"{where}.name", f"{name!r} must be a non-empty name no earlier node has")
    if not isinstance(target, str):
        raise CustomLossError(f"{where}.target", "must be a string")
    if op == "call_function" and target not in FUNCTIONS:
        raise CustomLossError(f"{where}.target", f"function {target!r} is not on this server's list of allowed "
                                                 "operations (torch math, torch.nn.functional losses, operators)")
    if op == "call_method" and target not in METHODS:
        raise CustomLossError(f"{where}.target", f"tensor method {target!r} is not on this server's list of "
                                                 "allowed operations")
    args, kwargs = node.get("args", []), node.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, Mapping):
        raise CustomLossError(where, "args must be a list and kwargs an object")
    if op == "call_function" and target == "getattr" and (len(args) != 2 or args[1] not in GETATTR_NAMES):
        raise CustomLossError(f"{where}.args", f"getattr may only read {sorted(GETATTR_NAMES)}")
    if "out" in kwargs:
        raise CustomLossError(f"{where}.kwargs", "out= is not allowed: a custom loss writes into no tensor")
    if op == "call_method" and target == "to" and not all(
            isinstance(a, Mapping) and ("dtype" in a or "ref" in a) for a in [*args[1:], *kwargs.values()]):
        raise CustomLossError(f"{where}.args", "to() may only change the dtype: the trainer decides the device")
    _check_value(f"{where}.args", args, seen)
    for value in kwargs.values():
        _check_value(f"{where}.kwargs", value, seen)
    if op == "output":
        _check_output(where, args)


def _check_value(where: str, value: Any, seen: set[str]) -> None:
    """An encoded argument (custom_graph.CustomLossNode's rules); refs must name EARLIER nodes."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for item in value:
            _check_value(where, item, seen)
        return
    if not isinstance(value, Mapping) or len(value) != 1:
        raise CustomLossError(where, f"{value!r} is not an encoded argument")
    (kind, inner), = value.items()
    if kind == "ref":
        if inner not in seen:
            raise CustomLossError(where, f"refers to {inner!r}, which is not an earlier node")
    elif kind in ("tuple", "slice") and isinstance(inner, list):
        for item in inner:
            _check_value(where, item, seen)
    elif kind == "dict" and isinstance(inner, Mapping):
        for item in inner.values():
            _check_value(where, item, seen)
    elif not _ALLOWED_CONSTANTS.get(kind, lambda _: False)(inner):
        # device, layout and memory_format included: the trainer decides where and how a loss runs.
        raise CustomLossError(where, f"argument {{{kind!r}: {inner!r}}} is not allowed")


_ALLOWED_CONSTANTS = {
    "float": lambda v: v in ("inf", "-inf", "nan"),
    "ellipsis": lambda v: v is True,
    "dtype": lambda v: v in DTYPES,
}


def _check_output(where: str, args: list) -> None:
    out = args[0] if len(args) == 1 else None
    parts = out.get("tuple") if isinstance(out, Mapping) else out
    if not (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], Mapping) and "ref" in parts[0]
            and isinstance(parts[1], Mapping) and isinstance(parts[1].get("dict"), Mapping)):
        raise CustomLossError(f"{where}.args", "the loss must return (loss tensor, {metric name: tensor})")
    for key, value in parts[1]["dict"].items():
        if not _METRIC_KEY.fullmatch(key) or not (isinstance(value, Mapping) and "ref" in value):
            raise CustomLossError(f"{where}.args", f"metric {key!r} must be a tensor named custom/<name>:sum or "
                                                   "custom/<name>:mean")


def loss_config(loss_id: str, loss_json: str) -> dict[str, float | str]:
    """The forward_backward event's loss_fn_config for a stored custom loss (`loss_json`: CustomLoss.to_json())."""
    return {LOSS_ID: loss_id, GRAPH: loss_json}


def spec_of_config(config: Mapping[str, float | str]) -> LossSpec:
    """The LossSpec that computes the custom loss `config` carries (see the module docstring)."""
    graph = config.get(GRAPH)
    if not isinstance(graph, str):
        raise CustomLossError(f"loss_fn_config.{LOSS_ID}",
                              "loss_fn 'custom' needs the loss_id of a loss created with create_custom_loss in this "
                              "session")
    unknown = sorted(set(config) - {LOSS_ID, GRAPH})
    if unknown:
        raise CustomLossError(f"loss_fn_config.{unknown[0]}", "loss_fn 'custom' takes only loss_id")
    return _spec(graph)


@functools.lru_cache(maxsize=64)  # one parse per loss while it is in use, however many requests name it
def _spec(graph_json: str) -> LossSpec:
    try:
        data = json.loads(graph_json)
    except ValueError as exc:
        raise CustomLossError(f"loss_fn_config.{GRAPH}", f"is not JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise CustomLossError(f"loss_fn_config.{GRAPH}", "must be a JSON object")
    loss = parse_custom_loss(data.get("name"), data.get("inputs"), {"format": 1, "nodes": data.get("nodes")})
    return LossSpec(f"custom:{loss.name}", _Graph(loss), f"custom loss {loss.name!r} (create_custom_loss)",
                    required_inputs=tuple(n for n, _ in loss.inputs[1:]), per_datum=True)


@dataclass(frozen=True)
class _Graph:
    """The loss function of a custom loss: its graph, run by custom_run.py (torch), loaded on the first call the
    way catalog._Builtin loads the built-ins (custom_run imports this module, not the other way round)."""

    loss: CustomLoss

    def __call__(self, target_logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                 config: Mapping[str, float | str]) -> LossOutput:
        return importlib.import_module("loss_plugins.custom_run").run_custom_loss(self.loss, target_logprobs, inputs)
