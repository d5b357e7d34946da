"""What a sampling request samples: a served base model, or a readable checkpoint's weights on its base model."""

from __future__ import annotations

import asyncio
import hashlib

from artifact_store import SamplingSession, TinkerPath
from bus_events.ids import sampling_session_id_for
from bus_gateway.errors import FieldError, NotFound
from bus_gateway.gateway import Gateway
from bus_gateway.submit import require_served
from bus_gateway.tinker_api.checkpoints import readable_checkpoint
from bus_gateway.validation import parse_path


async def resolve_model_path(gw: Gateway, tenant: str, model_path: str, field: str = "model_path") -> str:
    """The base model of a checkpoint the caller may read, its own or a published one (every kind holds a PEFT
    adapter)."""
    path = parse_path(model_path, field)
    try:
        return (await readable_checkpoint(gw, tenant, path))[0].base_model
    except NotFound as exc:
        raise FieldError(field, f"no checkpoint {path} (or it is not yours)", status_code=404) from exc


async def still_readable(gw: Gateway, tenant: str, session: SamplingSession) -> None:
    """A sampling session outlives the publication of the weights it samples: once their owner unpublishes them,
    other tenants' sessions on them stop sampling (404). The caller's own weights cost a cached run lookup."""
    if session.model_path is None:
        return
    path = TinkerPath.parse(session.model_path)
    try:
        await gw.run(path.run_id, tenant)
    except NotFound:
        if not await asyncio.to_thread(gw.checkpoints.publications.is_public, path):
            raise NotFound(f"checkpoint {path} is not published any more") from None


async def sampling_target(gw: Gateway, tenant: str, base_model: str | None,
                          model_path: str | None) -> tuple[str, str | None]:
    """(base model, checkpoint path or None) for sampling `model_path`, or the bare `base_model`."""
    if model_path is not None:
        base = await resolve_model_path(gw, tenant, model_path)
        if base_model is not None and base_model != base:
            raise FieldError("base_model", f"{model_path} was trained on {base!r}, not {base_model!r}")
        return base, str(parse_path(model_path, "model_path"))
    if base_model is None:
        raise FieldError("base_model", "give base_model or model_path")
    require_served(gw, base_model)
    return base_model, None


async def adhoc_sampling_session(gw: Gateway, tenant: str, base_model: str | None,
                                 model_path: str | None) -> SamplingSession:
    """Clients that address a model directly (older SDKs, the JSON API) get a stable per-target session."""
    base, path = await sampling_target(gw, tenant, base_model, model_path)
    digest = hashlib.sha256(f"{tenant}\0{base}\0{path}".encode()).hexdigest()[:20]
    session_id = sampling_session_id_for(f"adhoc-{digest}", 0)
    try:
        return await gw.sampling_session(session_id, tenant)
    except NotFound:
        session = SamplingSession(sampling_session_id=session_id, base_model=base, tenant=tenant, model_path=path)
        await gw.put_sampling_session(session)
        return session
