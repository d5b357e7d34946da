"""Sampling endpoints (tinker-protocol.md 2.3): sampling sessions live in the Registry; asample publishes one
event on the sample topic keyed by the sampling session id and answers a promise with sample_sequence_ids."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
from litestar import get, post
from litestar.params import JSONBody

from artifact_store import SamplingSession
from bus_events import payloads as p
from bus_events.ids import sampling_session_id_for
from bus_gateway import submit
from bus_gateway.csr import csr_to_dense
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.results import sample_sequence_ids
from bus_gateway.sampling_sessions import adhoc_sampling_session, sampling_target, still_readable
from bus_gateway.tinker_api.futures_api import promise
from bus_gateway.tinker_api.schemas import (
    CreateSamplingSessionRequest,
    CreateSamplingSessionResponse,
    SampleRequest,
    SamplerInfo,
    TensorDataIn,
    UntypedFuture,
)


@post("/api/v1/create_sampling_session", status_code=200, tags=["sampling"])
async def create_sampling_session(data: JSONBody[CreateSamplingSessionRequest], gw: GatewayDep,
                                  tenant: TenantDep) -> CreateSamplingSessionResponse:
    await gw.session(data.session_id, tenant)
    base, path = await sampling_target(gw, tenant, data.base_model, data.model_path)
    session_id = sampling_session_id_for(data.session_id, data.sampling_session_seq_id)
    await gw.put_sampling_session(SamplingSession(sampling_session_id=session_id, base_model=base, tenant=tenant,
                                                  model_path=path))
    return CreateSamplingSessionResponse(sampling_session_id=session_id)


@get("/api/v1/samplers/{sampler_id:str}", tags=["sampling"])
async def get_sampler(sampler_id: PathId, gw: GatewayDep, tenant: TenantDep) -> SamplerInfo:
    session = await gw.sampling_session(sampler_id, tenant)
    return SamplerInfo(sampler_id=session.sampling_session_id, base_model=session.base_model,
                       model_path=session.model_path)


def _check_options(data: SampleRequest) -> None:
    if data.prompt_logprobs_last_n is not None and not (data.prompt_logprobs or data.topk_prompt_logprobs):
        raise FieldError("prompt_logprobs_last_n", "requires prompt_logprobs")


def _target_ids(value: dict[str, Any] | None) -> tuple[np.ndarray | None, bool]:
    """target_prompt_logprobs (the SDK's TensorData JSON, dense or sparse CSR with -1 in unlisted cells) as a
    dense int64 array, and whether it came sparse (the answer then comes back in the same layout)."""
    if value is None:
        return None, False
    where = "target_prompt_logprobs"
    try:
        tensor = msgspec.convert(value, TensorDataIn)
        if tensor.dtype != "int64":
            raise FieldError(f"{where}.dtype", f"must be int64 token ids, got {tensor.dtype!r}")
        values = np.asarray(tensor.data)
        if values.size and (values.dtype.kind not in "iuf" or np.any(values != np.round(values))):
            raise FieldError(f"{where}.data", "token ids must be integers")
        data = values.astype(np.int64)
    except (msgspec.ValidationError, TypeError, OverflowError) as exc:
        raise FieldError(where, f"not a TensorData of int64 token ids: {exc}") from exc
    shape = tensor.shape if tensor.shape is not None else [data.size]
    if any(d < 0 for d in shape):
        raise FieldError(f"{where}.shape", f"negative dimension in {shape}")
    if math.prod(shape) > p.MAX_PROMPT_OUTPUT_CELLS:  # before a sparse tensor is made dense
        raise FieldError(f"{where}.shape", f"{shape} exceeds {p.MAX_PROMPT_OUTPUT_CELLS} cells")
    if tensor.sparse_crow_indices is None and tensor.sparse_col_indices is None:
        if math.prod(shape) != data.size:
            raise FieldError(where, f"shape {shape} needs {math.prod(shape)} values, got {data.size}")
        return data.reshape(shape), False
    if tensor.sparse_crow_indices is None or tensor.sparse_col_indices is None:
        raise FieldError(where, "sparse_crow_indices and sparse_col_indices come together")
    dense = csr_to_dense(data, np.asarray(tensor.sparse_crow_indices, dtype=np.int64),
                         np.asarray(tensor.sparse_col_indices, dtype=np.int64), shape, where, pad=-1)
    return dense, True


@post("/api/v1/asample", status_code=200, tags=["sampling"],
      summary="Sample; 429 asks the client to back off and resend the same seq_id")
async def asample(data: JSONBody[SampleRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    if data.sampling_session_id is not None:
        session = await gw.sampling_session(data.sampling_session_id, tenant)
        await still_readable(gw, tenant, session)
    else:
        session = await adhoc_sampling_session(gw, tenant, data.base_model, data.model_path)
    _check_options(data)
    target, sparse = _target_ids(data.target_prompt_logprobs)
    request = submit.SampleInput(
        prompt=submit.prompt_tokens(data.prompt.chunks), num_samples=data.num_samples, params=data.sampling_params,
        prompt_logprobs=bool(data.prompt_logprobs), topk_prompt_logprobs=data.topk_prompt_logprobs,
        context={"prompt_logprobs_last_n": data.prompt_logprobs_last_n, "target_prompt_logprobs_csr": sparse},
        topk_sample_logprobs=data.topk_sample_logprobs, target_prompt_ids=target,
        prompt_alt_tokens_k=data.prompt_alt_tokens_k)
    fut = await submit.sample(gw, tenant, session, request, data.seq_id)
    return promise(fut, sample_sequence_ids(session.sampling_session_id, fut.seq_id, fut.request_id,
                                            data.num_samples))


ROUTES = [create_sampling_session, get_sampler, asample]
