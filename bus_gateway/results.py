"""Results from the bus, in the shapes the SDK expects (tinker-protocol.md 2.4): JSON per request type,
protobuf for ForwardBackward and Sample when asked for, and `{"error","category"}` for failures."""

from __future__ import annotations

import math
from typing import Any

from bus_events import ContractError, EventType, Tensor, decode_result
from bus_events import payloads as p
from bus_gateway import proto_codec
from bus_gateway.futures import Future

PROTO_MEDIA_TYPE = "application/x-protobuf"


class MalformedResult(ValueError):
    """A worker replied with a result that does not fit its request type's schema."""


def failure(fut: Future) -> dict[str, str] | None:
    assert fut.result is not None
    if fut.result.error is not None:
        return {"error": fut.result.error.message, "category": fut.result.error.category}
    return None


def typed_result(fut: Future) -> Any:
    """The successful result of `fut` as its request type's struct (bus_events.RESULT_TYPES)."""
    assert fut.result is not None
    try:
        return decode_result(fut.request_type, fut.result.result)
    except ContractError as exc:
        raise MalformedResult(f"worker sent a {exc}") from exc


def forward_backward_result(fut: Future) -> p.ForwardBackwardResult:
    return typed_result(fut)


def sample_result(fut: Future) -> p.SampleResult:
    return typed_result(fut)


def sample_sequence_ids(sampling_session_id: str, seq_id: int | None, request_id: str, count: int) -> list[str]:
    """Unique within the sampling session: the SDK seq_id when it sent one, else the request id."""
    stem = f"{sampling_session_id}:{seq_id}" if seq_id is not None else f"{sampling_session_id}:{request_id}"
    return [f"{stem}:{i}" for i in range(count)]


def proto_body(fut: Future) -> bytes:
    if fut.request_type == EventType.FORWARD_BACKWARD:
        return proto_codec.encode_forward_backward_output(forward_backward_result(fut))
    return proto_codec.encode_sample_response(sample_result(fut), fut.context.get("prompt_logprobs_last_n"),
                                              bool(fut.context.get("target_prompt_logprobs_csr")))


def _tensor_json(tensor: Tensor) -> dict[str, Any]:
    values = tensor.numpy()
    dtype = "int64" if values.dtype.kind in "iu" else "float32"
    return {"data": values.reshape(-1).tolist(), "dtype": dtype, "shape": list(values.shape)}


def nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def forward_backward_json(result: p.ForwardBackwardResult) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{name: _tensor_json(t) for name, t in datum.items()} for datum in result.outputs],
        "metrics": result.metrics,
    }


def _is_topk_pad(token_id: int, logprob: float) -> bool:
    return token_id == p.TOPK_PAD_ID and logprob <= p.TOPK_PAD_LOGPROB


def sample_json(result: p.SampleResult, sequence_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"sequences": [
        {"tokens": seq.tokens.numpy().tolist(), "logprobs": seq.logprobs.numpy().tolist(),
         "stop_reason": seq.stop_reason, "sequence_id": sid}
        for seq, sid in zip(result.sequences, sequence_ids, strict=False)
    ]}
    if result.prompt_logprobs is not None:
        out["prompt_logprobs"] = nan_to_none(result.prompt_logprobs.numpy().tolist())
    if result.topk_prompt_logprobs is not None:
        ids = result.topk_prompt_logprobs.token_ids.numpy().tolist()
        lps = result.topk_prompt_logprobs.logprobs.numpy().tolist()
        out["topk_prompt_logprobs"] = [
            None if (not row_ids or _is_topk_pad(row_ids[0], row_lps[0]))
            else [[t, lp] for t, lp in zip(row_ids, row_lps, strict=True) if not _is_topk_pad(t, lp)]
            for row_ids, row_lps in zip(ids, lps, strict=True)
        ]
    return out


def json_body(fut: Future) -> dict[str, Any]:
    """The JSON result of a finished, successful request (tinker-protocol.md 2.4 table)."""
    assert fut.result is not None
    body = fut.result.result or {}
    kind = fut.request_type
    if kind == EventType.FORWARD_BACKWARD:
        return forward_backward_json(forward_backward_result(fut))
    if kind == EventType.SAMPLE:
        result = sample_result(fut)
        return sample_json(result, sample_sequence_ids(fut.model_id, fut.seq_id, fut.request_id,
                                                       len(result.sequences)))
    if kind == EventType.CREATE_MODEL:
        return {"model_id": fut.model_id, "type": "create_model"}
    if kind == EventType.LOAD_WEIGHTS:
        return _without_none({"model_id": fut.model_id, "path": body.get("path"), "type": "load_weights"})
    if kind == EventType.OPTIM_STEP:
        metrics = typed_result(fut).metrics
        return {"metrics": {k: float(v) for k, v in metrics.items()}}
    if kind == EventType.SAVE_WEIGHTS:
        path = typed_result(fut).path
        if path is None:
            raise MalformedResult("worker's save_weights result has no path")
        return {"path": path, "type": "save_weights"}
    if kind == EventType.SAVE_WEIGHTS_FOR_SAMPLER:
        saved = typed_result(fut)
        if saved.path is None and saved.sampling_session_id is None:
            raise MalformedResult("worker's save_weights_for_sampler result has neither path nor sampling_session_id")
        return _without_none({"path": saved.path, "sampling_session_id": saved.sampling_session_id,
                              "type": "save_weights_for_sampler"})
    if kind == EventType.SAVE_WEIGHTS_EXTERNAL:
        external = typed_result(fut)
        if external.path is None:
            raise MalformedResult("worker's save_weights_external result has no path")
        return _without_none({"path": external.path, "size_bytes": external.size_bytes,
                              "type": "save_weights_external"})
    if kind == EventType.UNLOAD_MODEL:
        return {"model_id": fut.model_id, "type": "unload_model"}
    return dict(body)


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
