"""Issue 16 item 1 through the whole stack, driven by the official tinker SDK 0.38 unmodified (real Tansu + moto
S3, tiny model): [N, K] cross_entropy targets, gspo, a server-side custom loss, the Dimuon optimizer (with a
save/resume of its state), and the gateway's 400s naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tinker
import torch
from gateway_stack import API_KEY, in_thread, running_stack
from tinker import types

pytest_plugins = ["gateway_support", "gateway_stack"]

TOKENS = [5, 17, 33, 2, 41, 8, 12, 60, 3]  # inside any test vocabulary


def _logprobs(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].data, dtype=np.float64).reshape(o["logprobs"].shape) for o in
            output.loss_fn_outputs]


def _ce(tokens: list[int], targets: np.ndarray, weights: np.ndarray) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": targets, "weights": weights})


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # the SDK raises its own error types; the message is what the test reads
        return str(exc)
    raise AssertionError("the request was accepted")


def losses_sequence(url: str, base_model: str) -> dict:
    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    seen: dict = {}
    training = service.create_lora_training_client(base_model=base_model, rank=4, seed=3).result()
    n = len(TOKENS) - 1
    inputs, targets = TOKENS[:-1], np.asarray(TOKENS[1:], dtype=np.int64)

    # 1-D forward: the reference logprobs of the true next tokens.
    one_d = training.forward([_ce(inputs, targets, np.ones(n, dtype=np.float32))], "cross_entropy").result()
    seen["lp_1d"] = _logprobs(one_d)[0]
    # [N, K] top-k distillation targets: column 0 the true token, the others arbitrary, with weights.
    topk = np.stack([targets, (targets + 1) % 50, (targets + 7) % 50], axis=1).astype(np.int64)
    weights = np.tile(np.asarray([0.6, 0.3, 0.1], dtype=np.float32), (n, 1))
    weights[0] = 0.0
    fb = training.forward_backward([_ce(inputs, topk, weights)], "cross_entropy").result()
    seen["topk_lp"], seen["topk_loss"], seen["topk_weights"] = _logprobs(fb)[0], fb.metrics["loss:sum"], weights
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    # gspo: the sampler's logprobs 0.1 below the trainer's, so every datum's sequence ratio is e^0.1.
    now = _logprobs(training.forward([_ce(inputs, targets, np.ones(n, dtype=np.float32))],
                                     "cross_entropy").result())[0]
    advantages = np.linspace(-1, 1, n).astype(np.float32)
    rl = types.Datum(model_input=types.ModelInput.from_ints(inputs),
                     loss_fn_inputs={"target_tokens": targets, "logprobs": (now - 0.1).astype(np.float32),
                                     "advantages": advantages})
    gspo = training.forward_backward([rl], "gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    seen["gspo"], seen["gspo_advantages"] = gspo.result().metrics, advantages

    # A server-side custom loss: create_custom_loss uploads it (client/config says so), one forward_backward runs it.
    def weighted_nll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/weighted_nll:sum": loss, "custom/tokens:mean": (weights > 0).float().sum()}

    handle = service.create_custom_loss(weighted_nll, {"logprobs": 1, "weights": 1}).result()
    seen["loss_id"] = handle.loss_id
    ce_data = [_ce(inputs, targets, np.ones(n, dtype=np.float32)), _ce(inputs[:4], targets[:4],
                                                                       np.ones(4, dtype=np.float32))]
    before = [lp.sum() for lp in _logprobs(training.forward(ce_data, "cross_entropy").result())]
    seen["custom"], seen["custom_expected"] = training.forward_backward_custom(ce_data, handle).result().metrics, \
        -float(sum(before))
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    # Validation: shapes and names, each 400 naming the field (the failures poison the gradient window of this
    # client's model, so the rest of the test uses others).
    seen["bad_shape"] = _error(lambda: training.forward_backward(
        [_ce(inputs, topk, np.ones(n, dtype=np.float32))], "cross_entropy").result())
    seen["stable_reinforce"] = _error(lambda: training.forward_backward([rl], "stable_reinforce").result())
    seen["gspo_bad_config"] = _error(lambda: training.forward_backward([rl], "gspo", {"clip": 1.0}).result())

    # Dimuon: created with it, stepped with DimuonParams, saved and resumed with its state.
    dimuon = service.create_lora_training_client(base_model=base_model, rank=4, seed=3,
                                                 optimizer=types.DimuonOptimizerConfig()).result()
    data = [_ce(inputs, targets, np.ones(n, dtype=np.float32))]
    seen["dimuon_start"] = _logprobs(dimuon.forward(data, "cross_entropy").result())[0]
    for _ in range(2):
        dimuon.forward_backward(data, "cross_entropy")
        seen["dimuon_optim"] = dimuon.optim_step(types.DimuonParams(learning_rate=0.02, beta1=0.9)).result()
    seen["dimuon_after"] = _logprobs(dimuon.forward(data, "cross_entropy").result())[0]
    seen["dimuon_info"] = dimuon.get_info()
    seen["dimuon_adam"] = _error(lambda: dimuon.optim_step(types.AdamParams(learning_rate=1e-3)).result())
    path = dimuon.save_state("dimuon-state").result().path
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    for client in (dimuon, resumed):
        client.forward_backward(data, "cross_entropy")
        client.optim_step(types.DimuonParams(learning_rate=0.02, beta1=0.9)).result()
    seen["dimuon_resumed"] = [_logprobs(c.forward(data, "cross_entropy").result())[0] for c in (dimuon, resumed)]
    # Weights only: the new run's optimizer is the one asked for (AdamW unless told), whatever the checkpoint's.
    seen["from_state"] = [service.create_training_client_from_state(path, **kwargs).result().get_info()
                          for kwargs in ({}, {"optimizer": types.DimuonOptimizerConfig()})]
    service.close("success").result()
    return seen


async def test_sdk_losses_and_dimuon(stack_settings):
    async with running_stack(stack_settings) as url:
        seen = await in_thread(losses_sequence, url, stack_settings.base_models[0])
    # [N, K]: column 0 is the 1-D logprob of the same token; the loss is the weighted sum over all K.
    topk_lp = seen["topk_lp"]
    assert topk_lp.shape == (len(TOKENS) - 1, 3) and (topk_lp <= 0).all()
    np.testing.assert_allclose(topk_lp[:, 0], seen["lp_1d"], atol=1e-5)
    assert seen["topk_loss"] == pytest.approx(float(-(seen["topk_weights"] * topk_lp).sum()), rel=1e-4)
    # gspo with ratio e^0.1 inside [0.5, 2]: L = −Σ e^0.1·A.
    assert seen["gspo"]["loss:sum"] == pytest.approx(-math.exp(0.1) * float(seen["gspo_advantages"].sum()),
                                                     abs=1e-4)
    assert seen["gspo"]["sequence_ratio:mean"] == pytest.approx(math.exp(0.1), rel=1e-4)
    assert "loss_fn_config.clip" in seen["gspo_bad_config"]
    # The custom loss ran on the server (it has a loss id) and gave the weighted NLL.
    assert seen["loss_id"] and seen["loss_id"].endswith(":loss:0")
    assert seen["custom"]["loss:sum"] == pytest.approx(seen["custom_expected"], rel=1e-4)
    assert seen["custom"]["custom/weighted_nll:sum"] == pytest.approx(seen["custom_expected"], rel=1e-4)
    assert seen["custom"]["custom/tokens:mean"] == pytest.approx((len(TOKENS) - 1 + 4) / 2)
    assert "data[0].loss_fn_inputs.weights" in seen["bad_shape"]
    assert "stable_reinforce" in seen["stable_reinforce"] and "not served" in seen["stable_reinforce"]
    # Dimuon trained, reports itself, refuses Adam parameters, and resumes to the same trajectory.
    assert not np.allclose(seen["dimuon_after"], seen["dimuon_start"])
    assert seen["dimuon_optim"].metrics["learning_rate"] == pytest.approx(0.02)
    assert seen["dimuon_info"].optimizer_config.type == "dimuon"
    assert "dimuon optimizer" in seen["dimuon_adam"] and "adamw parameters" in seen["dimuon_adam"]
    np.testing.assert_allclose(*seen["dimuon_resumed"], atol=1e-5)
    assert [info.optimizer_config.type for info in seen["from_state"]] == ["adamw", "dimuon"]
    assert torch.isfinite(torch.as_tensor(seen["dimuon_after"])).all()
