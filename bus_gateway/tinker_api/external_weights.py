"""External weights (tinker-protocol.md 2.2 save_weights_external, 2.5 external_weights_urls): a model's adapter in
PEFT format for use outside tinker, and signed, expiring URLs that download its files. `tinker checkpoint
download` is exactly: create_training_client_from_state, save_weights_external, external_weights_urls, a plain
GET per URL, set_checkpoint_ttl, delete_checkpoint.

The gateway serves the files itself instead of handing out S3-presigned URLs: the SDK GETs each URL without
credentials from wherever it runs, and the S3 endpoint the services use (`minio:9000` in compose) is often not
reachable from there, while the gateway is by definition. A URL carries a signed grant (artifact_store.signed_urls)
in place of the API key, and every download re-checks that its tenant may still read the checkpoint, so deleting
or unpublishing it revokes URLs already handed out.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec
from litestar import Request, get, post
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from artifact_store import CheckpointNotFound, InvalidPath, TinkerPath
from artifact_store.signed_urls import Grant, InvalidToken, UrlSigner, derive_key
from bus_events import payloads as p
from bus_gateway import submit
from bus_gateway.deps import GatewayDep, PathId, TenantDep
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.tinker_api.checkpoints import checkpoint_path, iso, readable_checkpoint
from bus_gateway.tinker_api.futures_api import promise
from bus_gateway.tinker_api.schemas import Body, ExternalWeightsUrls, Id, NonNegative, UntypedFuture
from bus_gateway.validation import checkpoint_name

URL_TTL_S = 3600  # the SDK re-signs when fewer than 5 minutes are left
FILES_ROUTE = "/api/v1/checkpoint_files"
# The download route takes no API key (the SDK sends none to these URLs): the token is the credential.
PUBLIC_PATHS = [f"^{FILES_ROUTE}/"]


class SaveWeightsExternalRequest(Body):
    model_id: Id
    path: str | None = None
    seq_id: NonNegative | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None
    age_encryption_recipients: list[str] | None = None
    type: Literal["save_weights_external"] = "save_weights_external"


def url_signer(gw: Gateway) -> UrlSigner:
    """Every gateway of a deployment shares the S3 secret, so each can check URLs any other one signed."""
    return UrlSigner(derive_key(gw.settings.s3_secret_key))


def _external(data: SaveWeightsExternalRequest) -> p.SaveWeightsExternal:
    if data.age_encryption_recipients:
        raise FieldError("age_encryption_recipients", "age encryption of exported weights is not supported here; "
                                                      "omit it (the download URLs are signed and expire)")
    return p.SaveWeightsExternal(name=checkpoint_name(data.path), ttl_seconds=data.ttl_seconds)


@post("/api/v1/save_weights_external", status_code=200, tags=["checkpoints"])
async def save_weights_external(data: JSONBody[SaveWeightsExternalRequest], gw: GatewayDep,
                                tenant: TenantDep) -> UntypedFuture:
    await gw.live_run(data.model_id, tenant)
    return promise(await submit.save_weights_external(gw, tenant, data.model_id, data.seq_id,
                                                      lambda: _external(data)))


@get("/api/v1/training_runs/{run_id:str}/checkpoints/{kind:str}/{name:str}/external_weights_urls",
     tags=["checkpoints"])
async def external_weights_urls(run_id: PathId, kind: FromPath[str], name: FromPath[str], request: Request,
                                gw: GatewayDep, tenant: TenantDep) -> ExternalWeightsUrls:
    """One signed URL per file of the checkpoint (any kind the caller may read; the SDK asks for external ones)."""
    path = checkpoint_path(run_id, kind, name)
    info, _ = await readable_checkpoint(gw, tenant, path)
    expires_at = int(time.time()) + URL_TTL_S
    signer, base = url_signer(gw), str(request.base_url).rstrip("/")
    urls = {}
    for file in sorted(info.files):
        token = signer.sign(Grant(key=gw.checkpoints.file_key(info, file), tinker_path=str(path), tenant=tenant,
                                  expires_at=expires_at))
        urls[file] = f"{base}{FILES_ROUTE}/{token}/{file}"
    return ExternalWeightsUrls(urls=urls, expires=iso(expires_at))


@get(f"{FILES_ROUTE}/{{token:str}}/{{file:str}}", tags=["checkpoints"],
     summary="A checkpoint file, through a signed URL from external_weights_urls (no API key)")
async def checkpoint_file(token: FromPath[str], file: FromPath[str], gw: GatewayDep) -> Stream:
    try:
        grant = url_signer(gw).verify(token, "GET")
        path = TinkerPath.parse(grant.tinker_path)
    except (InvalidToken, InvalidPath) as exc:
        raise PermissionDeniedException(detail=str(exc)) from exc
    info, _ = await readable_checkpoint(gw, grant.tenant, path)
    try:
        current = gw.checkpoints.file_key(info, file)
    except CheckpointNotFound as exc:
        raise NotFound(str(exc)) from exc
    if current != grant.key:
        raise NotFound(f"{path} was saved again since this URL was signed (or the URL names another file); "
                       "ask for new URLs")
    # A sync iterator: Litestar pulls each chunk from S3 in a worker thread, off the event loop.
    return Stream(gw.objects.read_chunks(current), media_type="application/octet-stream",
                  headers={"Content-Length": str(info.files[file]),
                           "Content-Disposition": f'attachment; filename="{file}"'})


ROUTES = [save_weights_external, external_weights_urls, checkpoint_file]
