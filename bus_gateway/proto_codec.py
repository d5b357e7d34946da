"""Protobuf <-> bus payloads: the forward_backward request body in, ForwardBackwardOutput / SampleResponse out."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from bus_events import Tensor, tensor_from_numpy, token_ids_tensor
from bus_events import payloads as p
from bus_gateway import proto_schema as pb
from bus_gateway.csr import csr_to_dense, dense_to_csr
from bus_gateway.errors import FieldError
from bus_gateway.validation import check_model_id, text_only

# Request-side dtypes (tinker-protocol.md 3.2: float32 or int64, int32 tolerated).
_PROTO_TO_NUMPY: dict[int, np.dtype] = {pb.DTYPE_FLOAT32: np.dtype("<f4"), pb.DTYPE_INT64: np.dtype("<i8"),
                                        pb.DTYPE_INT32: np.dtype("<i4")}
_WIRE_TO_PROTO = {"float32": pb.DTYPE_FLOAT32, "float64": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64,
                  "int32": pb.DTYPE_INT32}


def decompress_zstd(body: bytes, limit: int) -> bytes:
    """zstd with a hard output cap, so a small compressed bomb cannot exhaust memory."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise FieldError("body", f"Content-Encoding is zstd but the body does not decompress: {exc}") from exc
    if len(out) > limit:
        raise FieldError("body", f"decompressed body exceeds the {limit}-byte limit", status_code=413)
    return out


def declared_size(body: bytes, zstd: bool) -> int | None:
    """How many bytes the body is once decompressed: its own length, or the size its zstd frame header declares
    (None: not declared, or no zstd frame)."""
    if not zstd:
        return len(body)
    try:
        size = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        return None
    return size if size >= 0 else None


def _array(raw: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(raw) % dtype.itemsize:
        raise FieldError(where, f"{len(raw)} bytes is not a whole number of {dtype.name} values")
    return np.frombuffer(raw, dtype=dtype)


def _tensor(msg: Any, where: str) -> np.ndarray:
    dtype = _PROTO_TO_NUMPY.get(msg.dtype)
    if dtype is None:
        raise FieldError(f"{where}.dtype", f"unsupported dtype enum {msg.dtype}; send FLOAT32 or INT64")
    shape = [int(d) for d in msg.shape]
    if any(d < 0 for d in shape):
        raise FieldError(f"{where}.shape", f"negative dimension in {shape}")
    kind = msg.WhichOneof("encoding")
    if kind == "sparse_csr":
        return _dense_from_csr(msg.sparse_csr, dtype, shape, where)
    values = _array(msg.dense if kind == "dense" else b"", dtype, f"{where}.dense")
    if not shape:  # a hand-built TensorData without a shape: 1-D
        shape = [values.size]
    if math.prod(shape) != values.size:
        raise FieldError(where, f"shape {shape} needs {math.prod(shape)} values, got {values.size}")
    return values.reshape(shape)


def _dense_from_csr(csr: Any, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
    return csr_to_dense(_array(csr.values, dtype, f"{where}.sparse_csr.values"),
                        _array(csr.crow_indices, np.dtype("<i8"), f"{where}.sparse_csr.crow_indices"),
                        _array(csr.col_indices, np.dtype("<i8"), f"{where}.sparse_csr.col_indices"), shape, where)


def _tokens(datum: Any, where: str) -> np.ndarray:
    parts = []
    for j, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise text_only(f"{where}.model_input[{j}]", kind or "")
        parts.append(_array(chunk.encoded_text.tokens, np.dtype("<i4"), f"{where}.model_input[{j}].encoded_text"))
    return np.concatenate(parts) if parts else np.zeros(0, dtype="<i4")


def _loss_fn_config(msg: Any) -> dict[str, float | str]:
    """v2 (numbers and strings) wins; the legacy number-only map fills in keys v2 lacks."""
    config: dict[str, float | str] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        kind = value.WhichOneof("value")
        config[key] = value.text if kind == "text" else float(value.number)
    return config


def decode_forward_backward(body: bytes) -> tuple[str, int | None, Callable[[], p.ForwardBackward]]:
    """(model_id, seq_id, build) from a ForwardBackwardRequest; seq_id 0 means "not given" on this wire. `build`
    decodes the tensors: it runs inside the submission layer, so a bad tensor still voids the seq_id."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError, RecursionError) as exc:
        raise FieldError("body", f"not a valid ForwardBackwardRequest protobuf: {exc}") from exc
    if not msg.model_id:
        raise FieldError("model_id", "required")
    check_model_id(msg.model_id)
    if msg.seq_id < 0:
        raise FieldError("seq_id", f"must be >= 0, got {msg.seq_id}")
    return msg.model_id, (msg.seq_id or None), lambda: _forward_backward(msg)


def read_forward_backward(body: bytes, zstd_limit: int | None) -> tuple[str, int | None,
                                                                     Callable[[], p.ForwardBackward]]:
    """`decode_forward_backward` of a body that is zstd when `zstd_limit` (its decompressed cap) is given, with the
    tensors decoded here too, in one go: the gateway reads a body on its loop or in one worker thread, not in three
    thread hops, each a GIL hand-over (issue 14). A bad tensor is still raised only by `build`, so it voids the
    seq_id inside the submission layer."""
    if zstd_limit is not None:
        body = decompress_zstd(body, zstd_limit)
    model_id, seq_id, build = decode_forward_backward(body)
    try:
        payload = build()
    except Exception as exc:
        refusal = exc

        def refused() -> p.ForwardBackward:
            raise refusal

        return model_id, seq_id, refused
    return model_id, seq_id, lambda: payload


def _forward_backward(msg: Any) -> p.ForwardBackward:
    data = []
    for i, datum in enumerate(msg.data):
        where = f"data[{i}]"
        inputs = {}
        for name, tensor in datum.loss_fn_inputs.items():
            arr = _tensor(tensor, f"{where}.loss_fn_inputs.{name}")
            if name == "target_tokens" and arr.dtype.kind != "i":
                raise FieldError(f"{where}.loss_fn_inputs.target_tokens", "must be INT64 token ids")
            # target_tokens are token ids; every other input is a per-token float.
            inputs[name] = token_ids_tensor(arr) if name == "target_tokens" else tensor_from_numpy(arr, "float32")
        data.append(p.Datum(tokens=tensor_from_numpy(_tokens(datum, where), "int32"), loss_fn_inputs=inputs))
    return p.ForwardBackward(data=data, loss_fn=msg.loss_fn or "cross_entropy",
                             loss_fn_config=_loss_fn_config(msg), forward_only=msg.forward_only)


# ---------------------------------------------------------------------------------------------- responses


def _proto_values(tensor: Tensor) -> tuple[np.ndarray, int]:
    arr = tensor.numpy()
    if tensor.dtype == "float64":
        arr = arr.astype("<f4")
    return np.ascontiguousarray(arr), _WIRE_TO_PROTO[tensor.dtype]


def _array_record(outputs: list[dict[str, Tensor]]) -> Any:
    record = pb.ForwardBackwardOutput().loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(outputs)
    for name in outputs[0]:
        arrays = [_proto_values(datum[name]) for datum in outputs]
        batched = record.fields[name]
        batched.dtype = arrays[0][1]
        batched.trailing_shape.extend(arrays[0][0].shape[1:])
        batched.data = b"".join(a.tobytes() for a, _ in arrays)
        offsets = np.cumsum([0] + [a.nbytes for a, _ in arrays], dtype=np.int64)
        batched.offsets = offsets.astype("<i8").tobytes()
    return record


def _rectangular_runs(outputs: list[dict[str, Tensor]]) -> list[list[dict[str, Tensor]]]:
    """Consecutive datums whose fields share names, dtypes and trailing shapes can share one ArrayRecord."""
    def signature(datum: dict[str, Tensor]) -> tuple:
        return tuple(sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in datum.items()))

    runs: list[list[dict[str, Tensor]]] = []
    for datum in outputs:
        if runs and signature(runs[-1][-1]) == signature(datum):
            runs[-1].append(datum)
        else:
            runs.append([datum])
    return runs


def encode_forward_backward_output(result: p.ForwardBackwardResult) -> bytes:
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = "ArrayRecord"
    for run in _rectangular_runs(result.outputs):
        msg.loss_fn_outputs.append(_array_record(run))
    for key, value in result.metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


def _topk(topk: p.TopkLogprobs, target: Any, keep_rows_from: int = 0) -> None:
    ids = topk.token_ids.numpy().astype("<i4")
    logprobs = topk.logprobs.numpy().astype("<f4")
    if keep_rows_from:  # prompt_logprobs_last_n: earlier rows become padding ("no data")
        ids, logprobs = ids.copy(), logprobs.copy()
        ids[:keep_rows_from], logprobs[:keep_rows_from] = p.TOPK_PAD_ID, p.TOPK_PAD_LOGPROB
    target.token_ids = ids.tobytes()
    target.logprobs = logprobs.tobytes()
    target.length, target.k = (ids.shape[0], ids.shape[1]) if ids.ndim == 2 else (0, 0)


def _dense_tensor(values: np.ndarray, dtype: int, target: Any) -> None:
    target.dtype = dtype
    target.shape.extend(values.shape)
    target.dense = np.ascontiguousarray(values).tobytes()


def _target_logprobs(scored: Tensor, sparse: bool, target: Any) -> None:
    """The bus's float32 [P - 1, K] (NaN where nothing was asked) in the request's layout: 0.0 in those cells
    when dense, left out when sparse CSR (tinker-protocol.md 3.2)."""
    values = scored.numpy().astype("<f4")
    asked = ~np.isnan(values)
    if not sparse:
        _dense_tensor(np.where(asked, values, np.float32(0)), pb.DTYPE_FLOAT32, target)
        return
    listed, crow, cols = dense_to_csr(values, asked)
    target.dtype = pb.DTYPE_FLOAT32
    target.shape.extend(values.shape)
    target.sparse_csr.values = listed.astype("<f4").tobytes()
    target.sparse_csr.crow_indices = crow.astype("<i8").tobytes()
    target.sparse_csr.col_indices = cols.astype("<i8").tobytes()


def encode_sample_response(result: p.SampleResult, prompt_logprobs_last_n: int | None = None,
                           target_sparse: bool = False) -> bytes:
    msg = pb.SampleResponse()
    for seq in result.sequences:
        out = msg.sequences.add()
        out.stop_reason = pb.STOP_REASON_STOP if seq.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        out.tokens = seq.tokens.numpy().astype("<i4").tobytes()
        out.logprobs = seq.logprobs.numpy().astype("<f4").tobytes()
        if seq.topk_logprobs is not None:
            _topk(seq.topk_logprobs, out.topk_sampled_logprobs)
    msg.prompt_cache_hit_tokens = result.prompt_cache_hit_tokens
    if result.target_prompt_logprobs is not None:
        _target_logprobs(result.target_prompt_logprobs, target_sparse, msg.target_prompt_logprobs)
    if result.prompt_alt_tokens is not None:
        _dense_tensor(result.prompt_alt_tokens.tokens.numpy().astype("<i8"), pb.DTYPE_INT64,
                      msg.prompt_alt_tokens.tokens)
        _dense_tensor(result.prompt_alt_tokens.logprobs.numpy().astype("<f4"), pb.DTYPE_FLOAT32,
                      msg.prompt_alt_tokens.logprobs)
    hide_before = 0
    if result.prompt_logprobs is not None:
        values = result.prompt_logprobs.numpy().astype("<f4")
        if prompt_logprobs_last_n:
            hide_before = max(0, values.size - prompt_logprobs_last_n)
            values = values.copy()
            values[:hide_before] = np.nan
        msg.prompt_logprobs = values.tobytes()
    if result.topk_prompt_logprobs is not None:
        _topk(result.topk_prompt_logprobs, msg.topk_prompt_logprobs, hide_before)
    return msg.SerializeToString()
