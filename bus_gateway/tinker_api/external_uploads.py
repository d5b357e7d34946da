"""SDK 0.39's external_weights_upload_start / _finish: bring a PEFT LoRA adapter trained elsewhere in as
tinker://<run>/external_weights/<name> (sampled like any checkpoint, downloaded, published, copied) in a new run of
the caller's that cannot be trained on.

0.39's wire shapes were not available to us; this is the obvious REST shape next to 0.38's external_weights_urls:

    POST /api/v1/external_weights/upload_start  {"name", "base_model", "ttl_seconds"?}
      -> {"upload_id", "tinker_path", "urls": {file: signed PUT URL}, "expires"}
    PUT <url> with the file's bytes (no API key: the URL's signed grant is the credential)
    POST /api/v1/external_weights/upload_finish {"upload_id"} -> {"tinker_path", "size_bytes"}

Uploaded bodies go through the gateway (max_body_bytes each), like downloads, for the same reason
(external_weights.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import msgspec
from litestar import Request, post, put
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, JSONBody

from artifact_store import TinkerPath, TrainingRun
from artifact_store.lora_targets import trained_blocks
from artifact_store.signed_urls import Grant, InvalidToken
from artifact_store.uploads import UPLOAD_FILES, InvalidUpload, Uploads
from bus_events import payloads as p
from bus_events.ids import model_id_for
from bus_gateway.deps import GatewayDep, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.submit import require_served
from bus_gateway.tinker_api.checkpoints import iso
from bus_gateway.tinker_api.external_weights import URL_TTL_S, url_signer
from bus_gateway.tinker_api.schemas import Body
from bus_gateway.validation import build, checkpoint_name

UPLOADS_ROUTE = "/api/v1/checkpoint_uploads"
PUBLIC_PATHS = [f"^{UPLOADS_ROUTE}/"]


class UploadStartRequest(Body):
    name: str
    base_model: str
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None


class UploadStartResponse(msgspec.Struct):
    upload_id: str
    tinker_path: str
    urls: dict[str, str]
    expires: str


class UploadFinishRequest(Body):
    upload_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class UploadedFile(msgspec.Struct):
    file: str
    size_bytes: int


class UploadFinishResponse(msgspec.Struct):
    tinker_path: str
    size_bytes: int


@post("/api/v1/external_weights/upload_start", status_code=200, tags=["checkpoints"])
async def upload_start(data: JSONBody[UploadStartRequest], request: Request, gw: GatewayDep,
                       tenant: TenantDep) -> UploadStartResponse:
    name = checkpoint_name(data.name, "name")
    require_served(gw, data.base_model)
    uploads, expires_at, upload_id = Uploads(gw.checkpoints), int(time.time()) + URL_TTL_S, Uploads.new_id()
    path = TinkerPath(model_id_for(f"upload-{upload_id[:24]}", 0), "external_weights", name)
    upload = await asyncio.to_thread(uploads.start, upload_id, tenant, path, data.base_model, expires_at,
                                     data.ttl_seconds)
    signer, base = url_signer(gw), str(request.base_url).rstrip("/")
    urls = {file: f"{base}{UPLOADS_ROUTE}/" + signer.sign(Grant(
        key=uploads.staged_key(upload.upload_id, file), tinker_path=str(path), tenant=tenant, expires_at=expires_at,
        method="PUT")) + f"/{file}" for file in UPLOAD_FILES}
    return UploadStartResponse(upload_id=upload.upload_id, tinker_path=str(path), urls=urls, expires=iso(expires_at))


@put(f"{UPLOADS_ROUTE}/{{token:str}}/{{file:str}}", status_code=200, tags=["checkpoints"],
     summary="A file of an upload, through a signed URL from upload_start (no API key)")
async def upload_file(token: FromPath[str], file: FromPath[str], request: Request, gw: GatewayDep) -> UploadedFile:
    try:
        grant = url_signer(gw).verify(token, "PUT")
    except InvalidToken as exc:
        raise PermissionDeniedException(detail=str(exc)) from exc
    if not grant.key.endswith(f"/{file}"):
        raise NotFound(f"this URL uploads {grant.key.rsplit('/', 1)[-1]!r}, not {file!r}")
    body = await request.body()
    await asyncio.to_thread(gw.objects.put_bytes, grant.key, body)
    return UploadedFile(file=file, size_bytes=len(body))


@post("/api/v1/external_weights/upload_finish", status_code=200, tags=["checkpoints"])
async def upload_finish(data: JSONBody[UploadFinishRequest], gw: GatewayDep,
                        tenant: TenantDep) -> UploadFinishResponse:
    uploads = Uploads(gw.checkpoints)
    upload = await asyncio.to_thread(uploads.get, data.upload_id)
    if upload is None or upload.tenant != tenant:
        raise FieldError("upload_id", f"no upload {data.upload_id!r} (or it expired, or it is not yours)",
                         status_code=404)
    try:
        files, config = await asyncio.to_thread(uploads.staged, upload)
    except InvalidUpload as exc:
        raise FieldError("upload_id", str(exc)) from exc
    attn, mlp, unembed = trained_blocks(config["target_modules"])
    lora = build(p.LoraSpec, "adapter_config", rank=config["r"], train_attn=attn, train_mlp=mlp,
                 train_unembed=unembed)  # a rank or target set we cannot serve is a 400 before anything is written
    path = TinkerPath.parse(upload.tinker_path)
    run = TrainingRun(model_id=path.run_id, base_model=upload.base_model, tenant=tenant, lora=lora, unloaded=True)
    await asyncio.to_thread(gw.registry.put_run, run)
    info = await asyncio.to_thread(uploads.commit, upload, files)
    return UploadFinishResponse(tinker_path=str(info.path), size_bytes=info.size_bytes)


ROUTES = [upload_start, upload_finish]
UPLOAD_ROUTES = [upload_file]  # bodies of up to max_body_bytes (app.DATA_ROUTES)
