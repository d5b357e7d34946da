"""Server-side custom losses: a graph the official SDK traced and encoded, run by the server, must give what the
SDK's own client-side runner (run_loss_handle) gives; anything off the allowed lists is refused, naming the part."""

from __future__ import annotations

import json

import pytest
import torch
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss

from loss_plugins import LossInputError, compute_loss
from loss_plugins.custom_graph import CustomLossError, loss_config, parse_custom_loss


def _weighted_policy(logprobs, weights, advantages):
    ratio = torch.exp(logprobs - logprobs.detach())
    loss = -(ratio * advantages * weights).sum() + 0.1 * torch.nn.functional.softplus(logprobs).mean()
    n = logprobs.shape[0]
    return loss, {"custom/loss:sum": loss, "custom/kept:mean": (weights > 0).float().sum() / n,
                  "custom/floor:mean": torch.clamp(logprobs, min=-2.0).max()}


def _upload(fn, ranks):
    """What create_custom_loss sends: name, inputs and graph, as JSON values."""
    handle = trace_loss(fn, ranks, "session")
    graph = encode_graph(handle).model_dump(mode="json")
    return handle, handle.name, [i.model_dump(mode="json") for i in handle.inputs], graph


def _datum(n, seed):
    # float32 values (what TensorData carries), held in float64: both sides then compute the same numbers.
    g = torch.Generator().manual_seed(seed)
    return {"logprobs": (-torch.rand(n, generator=g) * 3).double(),
            "weights": (torch.rand(n, generator=g) > 0.3).double(),
            "advantages": torch.randn(n, generator=g).double()}


def test_server_result_equals_the_sdks_client_side_run():
    handle, name, inputs, graph = _upload(_weighted_policy, {"logprobs": 1, "weights": 1, "advantages": 1})
    config = loss_config("loss-1", parse_custom_loss(name, inputs, graph).to_json())
    datums = [_datum(5, 1), _datum(3, 2)]
    # The SDK's reference: per-datum logprobs with gradients, run_loss_handle over SDK Datums.
    sdk_lps = [d["logprobs"].clone().requires_grad_() for d in datums]
    sdk_data = [types.Datum(model_input=types.ModelInput.from_ints([0] * len(d["logprobs"])),
                            loss_fn_inputs={"target_tokens": types.TensorData.from_torch(torch.zeros(len(
                                d["logprobs"]), dtype=torch.int64)),
                                "weights": types.TensorData.from_torch(d["weights"]),
                                "advantages": types.TensorData.from_torch(d["advantages"])}) for d in datums]
    want_loss, want_metrics = run_loss_handle(handle, sdk_data, sdk_lps)
    want_loss.backward()
    ours = torch.cat([d["logprobs"] for d in datums]).requires_grad_()
    out = compute_loss("custom", ours, {k: torch.cat([d[k] for d in datums]) for k in ("weights", "advantages")},
                       config, [5, 3])
    out.loss.backward()
    assert out.loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    assert ours.grad.tolist() == pytest.approx(torch.cat([lp.grad for lp in sdk_lps]).tolist(), rel=1e-12)
    for key, value in want_metrics.items():
        assert out.metrics[key] == pytest.approx(value, rel=1e-12)
    assert out.metrics["loss:sum"] == pytest.approx(want_loss.item(), rel=1e-12)


def _node(graph, target):
    return next(i for i, n in enumerate(graph["nodes"]) if n["target"] == target)


@pytest.mark.parametrize("mutate, field, message", [
    (lambda g: g["nodes"][_node(g, "torch.exp")].update(target="os.system"), "target", "not on this server's list"),
    (lambda g: g["nodes"][_node(g, "detach")].update(target="backward"), "target", "tensor method 'backward'"),
    (lambda g: g["nodes"][_node(g, "detach")].update(op="get_attr"), "op", "not allowed"),
    (lambda g: g["nodes"][_node(g, "torch.exp")]["kwargs"].update(device={"device": "cuda"}), "kwargs", "device"),
    (lambda g: g["nodes"][_node(g, "torch.exp")]["args"].__setitem__(0, {"ref": "nowhere"}), "args",
     "not an earlier node"),
])
def test_anything_off_the_lists_is_refused_naming_the_node(mutate, field, message):
    _, name, inputs, graph = _upload(_weighted_policy, {"logprobs": 1, "weights": 1, "advantages": 1})
    mutate(graph)
    with pytest.raises(CustomLossError, match=message) as caught:
        parse_custom_loss(name, inputs, graph)
    assert caught.value.field.startswith("graph.nodes[") and caught.value.field.endswith(field)


def test_rank_zero_inputs_and_bad_metric_names_are_refused():
    _, name, inputs, graph = _upload(_weighted_policy, {"logprobs": 1, "weights": 1, "advantages": 1})
    inputs[2]["rank"] = 0
    with pytest.raises(CustomLossError, match="rank-0") as caught:
        parse_custom_loss(name, inputs, graph)
    assert caught.value.field == "inputs[2].rank"
    inputs[2]["rank"] = 1
    graph["nodes"][-1]["args"][0]["tuple"][1]["dict"]["loss:sum"] = {"ref": "exp"}
    with pytest.raises(CustomLossError, match="custom/<name>"):
        parse_custom_loss(name, inputs, graph)


def test_a_graph_that_would_blow_up_memory_is_stopped_before_allocating():
    def outer(logprobs):
        loss = (logprobs.unsqueeze(0) * logprobs.unsqueeze(1)).sum()
        return loss, {"custom/outer:sum": loss}

    _, name, inputs, graph = _upload(outer, {"logprobs": 1})
    config = loss_config("loss-2", parse_custom_loss(name, inputs, graph).to_json())
    assert compute_loss("custom", torch.ones(10), {}, config).loss.item() == 100.0  # small: fine
    with pytest.raises(LossInputError, match="would hold 1000000 elements"):
        compute_loss("custom", torch.ones(1000), {}, config)


def test_custom_loss_needs_its_stored_graph_and_declared_ranks():
    with pytest.raises(CustomLossError, match="loss_id") as caught:
        compute_loss("custom", torch.ones(3), {}, {"loss_id": "x"})
    assert caught.value.field == "loss_fn_config.loss_id"
    _, name, inputs, graph = _upload(_weighted_policy, {"logprobs": 1, "weights": 1, "advantages": 1})
    config = loss_config("loss-3", parse_custom_loss(name, inputs, graph).to_json())
    with pytest.raises(LossInputError, match="advantages"):
        compute_loss("custom", torch.ones(3), {"weights": torch.ones(3)}, config)
    with pytest.raises(LossInputError, match="rank 1, but target_tokens has rank 2"):
        compute_loss("custom", torch.ones(3, 2), {"weights": torch.ones(3, 2), "advantages": torch.ones(3, 2)},
                     config)
    assert json.loads(config["graph"])["name"] == "_weighted_policy"


def test_every_allowed_function_name_resolves_to_a_callable():
    from loss_plugins.custom_graph import FUNCTIONS
    from loss_plugins.custom_run import _function

    assert all(callable(_function(name)) for name in FUNCTIONS)


def _graph(*nodes, output="loss"):
    """A hand-written graph over logprobs [T]: `nodes` as (name, op, target, args, kwargs)."""
    body = [{"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}}]
    body += [{"op": op, "name": name, "target": target, "args": args, "kwargs": kwargs}
             for name, op, target, args, kwargs in nodes]
    body.append({"op": "output", "name": "output", "target": "output",
                 "args": [{"tuple": [{"ref": output}, {"dict": {}}]}], "kwargs": {}})
    return {"format": 1, "nodes": body}


def _run_graph_json(graph, logprobs):
    loss = parse_custom_loss("hand", [{"name": "logprobs", "rank": 1}], graph)
    return compute_loss("custom", logprobs, {}, loss_config("loss-h", loss.to_json()))


def test_scalar_tricks_cannot_burn_cpu_or_memory():
    ref = {"ref": "logprobs"}
    strings = _graph(("big", "call_function", "operator.mul", ["ab", 10**9], {}), ("loss", "call_method", "sum",
                                                                                     [ref], {}))
    with pytest.raises(LossInputError, match="operators take tensors or numbers"):
        _run_graph_json(strings, torch.ones(3))
    squaring = [("n0", "call_function", "operator.add", [10, 0], {})]
    squaring += [(f"n{i}", "call_function", "operator.mul", [{"ref": f"n{i - 1}"}, {"ref": f"n{i - 1}"}], {})
                 for i in range(1, 40)]
    with pytest.raises(LossInputError, match="integer beyond 2\\*\\*63"):
        _run_graph_json(_graph(*squaring, ("loss", "call_method", "sum", [ref], {})), torch.ones(3))


def test_device_moves_and_out_arguments_are_refused():
    ref = {"ref": "logprobs"}
    with pytest.raises(CustomLossError, match="only change the dtype") as caught:
        parse_custom_loss("hand", [{"name": "logprobs", "rank": 1}],
                          _graph(("moved", "call_method", "to", [ref, "cuda"], {}), output="moved"))
    assert caught.value.field == "graph.nodes[1].args"
    with pytest.raises(CustomLossError, match="out= is not allowed"):
        parse_custom_loss("hand", [{"name": "logprobs", "rank": 1}],
                          _graph(("e", "call_function", "torch.exp", [ref], {"out": ref}), output="e"))


def test_data_dependent_shapes_run_and_a_failing_node_is_named():
    def positive_only(logprobs, weights):
        kept = logprobs[weights > 0]
        loss = -kept.sum()
        return loss, {"custom/kept:sum": (weights > 0).float().sum()}

    _, name, inputs, graph = _upload(positive_only, {"logprobs": 1, "weights": 1})
    config = loss_config("loss-4", parse_custom_loss(name, inputs, graph).to_json())
    out = compute_loss("custom", torch.tensor([-1.0, -2.0, -4.0]), {"weights": torch.tensor([1.0, 0.0, 1.0])},
                       config)
    assert out.loss.item() == 5.0 and out.metrics["custom/kept:sum"] == 2.0
    ref = {"ref": "logprobs"}
    bad = _graph(("r", "call_method", "reshape", [ref, 7, 7], {}), ("loss", "call_method", "sum", [{"ref": "r"}],
                                                                   {}))
    with pytest.raises(LossInputError, match="node 'r' \\(reshape\\) failed"):
        _run_graph_json(bad, torch.ones(3))
