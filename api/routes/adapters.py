"""`/v1/adapters` (per-tenant LoRA adapters), `/v1/models`, and `/v1/estimates`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from api.deps import CurrentTenant, SessionDep, StoreDep
from shared import adapters
from shared.files import service as files
from shared.jobs import service as jobs
from shared.jobs.schemas import (
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    EstimateObject,
    JobCreate,
)
from shared.models import Adapter
from shared.storage import MAX_PRESIGN_SECONDS
from shared.tenancy import service as tenancy

router = APIRouter(tags=["adapters"])


@router.get("/v1/adapters", response_model=AdapterList)
def list_adapters(
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> AdapterList:
    rows, has_more = adapters.list_adapters(session, tenant_id=tenant.id, after=after, limit=limit)
    return AdapterList(data=[AdapterObject.of(r) for r in rows], has_more=has_more)


@router.get("/v1/adapters/{adapter_id}", response_model=AdapterObject)
def get_adapter(adapter_id: str, tenant: CurrentTenant, session: SessionDep) -> AdapterObject:
    return AdapterObject.of(
        adapters.get_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id)
    )


@router.get("/v1/adapters/{adapter_id}/download")
def download_adapter(
    request: Request,
    adapter_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    store: StoreDep,
    redirect: bool = False,
) -> Response:
    """The PEFT folder as a .tar.gz; `?redirect=true` answers 307 to a presigned URL that
    expires within 15 minutes instead of streaming through the API."""
    row = adapters.get_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id)
    key = row.storage_prefix + adapters.ARCHIVE_NAME
    if redirect:
        url = store.presigned_get(key, expires=MAX_PRESIGN_SECONDS)
        if url.startswith("/"):
            url = str(request.base_url).rstrip("/") + url
        return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        store.iter_chunks(key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{row.id}.tar.gz"',
            "Content-Length": str(store.size(key)),
        },
    )


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted)
def delete_adapter(
    adapter_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> AdapterDeleted:
    row = adapters.delete_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id)
    session.commit()
    store.delete_prefix(row.storage_prefix)
    return AdapterDeleted(id=row.id)


@router.get("/v1/models")
def list_models(tenant: CurrentTenant, session: SessionDep) -> dict[str, Any]:
    """Base models this tenant may tune (all registered ones) and its own adapters."""
    data: list[dict[str, Any]] = [
        {
            "id": m.name,
            "object": "model",
            "created": int(m.created_at.timestamp()),
            "owned_by": "system",
        }
        for m in tenancy.list_models(session)
    ]
    rows = session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant.id).order_by(Adapter.created_at)
    )
    data += [
        {
            "id": a.name,
            "object": "model",
            "created": int(a.created_at.timestamp()),
            "owned_by": tenant.id,
            "root": a.base_model,
            "adapter_id": a.id,
        }
        for a in rows
    ]
    return {"object": "list", "data": data, "has_more": False}


@router.post("/v1/estimates", response_model=EstimateObject)
def create_estimate(body: JobCreate, tenant: CurrentTenant, session: SessionDep) -> EstimateObject:
    """Same body as a job; nothing is created."""
    model = tenancy.get_model_by_name(session, name=body.model)
    files.get_file(session, tenant_id=tenant.id, file_id=body.training_file, param="training_file")
    spec = jobs.build_spec(body)
    result, queue = jobs.estimate(model, spec)
    parts = {
        k: v
        for k, v in jobs.estimate_dict(result).items()
        if k.endswith("_bytes") and k != "total_bytes"
    }
    return EstimateObject(
        model=body.model,
        gpu_class=result.gpu_class,
        queue=queue,
        fits=queue is not None,
        total_bytes=result.total_bytes,
        parts=parts,
        trainable_params=result.trainable_params,
        qlora=spec.model_dump(mode="json"),
    )
