"""POST /api/v1/export_model: an asynchronous export job (not part of the Tinker SDK). The trainer merges the
checkpoint's LoRA into its base model (event export_model, docs/events.md) and the future's result lists presigned
URLs of the merged model's files (safetensors, config, tokenizer), which plain `transformers` loads.

    POST /api/v1/export_model {"path": "tinker://<run>/sampler_weights/<name>", "dtype": "bfloat16"}
      -> {"request_id": ...}; POST /api/v1/retrieve_future {"request_id": ...}
      -> {"path", "prefix", "urls": {file: url}, "size_bytes"}
"""

from __future__ import annotations

import msgspec
from litestar import post
from litestar.params import JSONBody

from bus_events import payloads as p
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError
from bus_gateway.tinker_api.checkpoints import owned_checkpoint
from bus_gateway.tinker_api.futures_api import promise
from bus_gateway.tinker_api.schemas import Body, UntypedFuture
from bus_gateway.validation import parse_path

DTYPES = ("bfloat16", "float16", "float32")


class ExportModelRequest(Body):
    path: str
    dtype: str | None = None
    url_ttl_seconds: int = msgspec.field(default=86400)


@post("/api/v1/export_model", status_code=200, tags=["checkpoints"])
async def export_model(data: JSONBody[ExportModelRequest], gw: GatewayDep, tenant: TenantDep) -> UntypedFuture:
    path = parse_path(data.path, "path")
    if data.dtype is not None and data.dtype not in DTYPES:
        raise FieldError("dtype", f"must be one of {', '.join(DTYPES)}, got {data.dtype!r}")
    if not 1 <= data.url_ttl_seconds <= 7 * 24 * 3600:
        raise FieldError("url_ttl_seconds", f"must be 1..604800 (S3's limit), got {data.url_ttl_seconds}")
    await owned_checkpoint(gw, tenant, path)  # 404 unless this tenant's run holds the checkpoint
    payload = p.ExportModel(path=str(path), dtype=data.dtype, url_ttl_seconds=data.url_ttl_seconds)
    return promise(await gw.submit(p.ExportModel, lambda: payload, model_id=path.run_id, seq_id=None, tenant=tenant))


ROUTES = [export_model]
