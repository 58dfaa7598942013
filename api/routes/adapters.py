"""`/v1/adapters` (per-tenant LoRA adapters), `/v1/models`, and `/v1/estimates`."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from api.deps import CurrentTenant, SessionDep, StoreDep
from api.routes.jobs import relay_outbox
from shared import adapters, merges
from shared.errors import Forbidden
from shared.files import service as files
from shared.jobs import retention, sources
from shared.jobs import service as jobs
from shared.jobs.schemas import (
    AdapterDeleted,
    AdapterList,
    AdapterObject,
    EstimateObject,
    JobCreate,
)
from shared.jobs.sources import TrainedSource
from shared.models import Adapter, RegisteredModel
from shared.storage import MAX_PRESIGN_SECONDS, ObjectStore
from shared.tenancy import service as tenancy

router = APIRouter(tags=["adapters"])
log = logging.getLogger("api.adapters")


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
    return archive_response(request, store, key, filename=f"{row.id}.tar.gz", redirect=redirect)


def archive_response(
    request: Request, store: ObjectStore, key: str, *, filename: str, redirect: bool
) -> Response:
    """A stored .tar.gz streamed through the API, or with `redirect` a 307 to a presigned URL
    that expires within 15 minutes."""
    if redirect:
        url = store.presigned_get(key, expires=MAX_PRESIGN_SECONDS)
        if url.startswith("/"):
            url = str(request.base_url).rstrip("/") + url
        return RedirectResponse(url, status_code=307)
    return StreamingResponse(
        store.iter_chunks(key),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(store.size(key)),
        },
    )


@router.delete("/v1/adapters/{adapter_id}", response_model=AdapterDeleted)
def delete_adapter(
    request: Request, adapter_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> AdapterDeleted:
    row = adapters.delete_adapter(session, tenant_id=tenant.id, adapter_id=adapter_id)
    session.commit()
    # Post-commit: the answer is the committed delete. Objects the store refuses now stay
    # scheduled in `object_deletions` and the sweeper deletes them later.
    try:
        retention.drain_deletions(request.app.state.sessions, store, limit=20)
    except Exception as exc:
        log.warning("adapter %s: object deletion deferred (%s)", row.id, type(exc).__name__)
    return AdapterDeleted(id=row.id)


def _base_model_object(model: RegisteredModel) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": "system",
    }


def _fine_tuned_object(adapter: Adapter) -> dict[str, Any]:
    return {
        "id": adapter.name,
        "object": "model",
        "created": int(adapter.created_at.timestamp()),
        "owned_by": adapter.tenant_id,
        "root": adapter.base_model,
        "adapter_id": adapter.id,
    }


def _trained_object(source: TrainedSource) -> dict[str, Any]:
    """A fine-tuned model or a checkpoint (`…:ckpt-step-{n}`) as `models.retrieve` shows it."""
    return {
        "id": source.name,
        "object": "model",
        "created": int(source.created_at.timestamp()),
        "owned_by": source.tenant_id,
        "root": source.base_model,
    }


@router.get("/v1/models")
def list_models(tenant: CurrentTenant, session: SessionDep) -> dict[str, Any]:
    """Base models this tenant may tune (all registered ones) and its own adapters."""
    data = [_base_model_object(m) for m in tenancy.list_models(session)]
    rows = session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant.id).order_by(Adapter.created_at)
    )
    data += [_fine_tuned_object(a) for a in rows]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/v1/models/{model:path}")
def retrieve_model(model: str, tenant: CurrentTenant, session: SessionDep) -> dict[str, Any]:
    """A base model, or one of this tenant's fine-tuned models (`models.retrieve`)."""
    if not model.startswith("ft:"):
        return _base_model_object(tenancy.get_model_by_name(session, name=model))
    source = sources.find_trained(session, tenant_id=tenant.id, name=model)
    if source.kind == "checkpoint":
        return _trained_object(source)
    return _fine_tuned_object(
        adapters.get_adapter_by_name(session, tenant_id=tenant.id, name=model)
    )


@router.delete("/v1/models/{model:path}")
def delete_model(
    request: Request, model: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> dict[str, Any]:
    """Delete one of this tenant's fine-tuned models (`models.delete`): the adapter, its
    objects and its job's checkpoints, as `DELETE /v1/adapters/{id}` does. Base models are
    the operator's: 403."""
    if not model.startswith("ft:"):
        tenancy.get_model_by_name(session, name=model)  # 404 when there is no such model
        raise Forbidden(
            f"{model!r} is a base model; only fine-tuned models can be deleted",
            param="model",
            code="model_not_deletable",
        )
    if sources.find_trained(session, tenant_id=tenant.id, name=model).kind == "checkpoint":
        raise Forbidden(
            f"{model!r} is a checkpoint; it goes with its job (DELETE /v1/fine_tuning/jobs/"
            "{id}) or its job's fine-tuned model",
            param="model",
            code="model_not_deletable",
        )
    row = adapters.get_adapter_by_name(session, tenant_id=tenant.id, name=model)
    delete_adapter(request, row.id, tenant, session, store)
    return {"id": model, "object": "model", "deleted": True}


@router.post("/v1/estimates", response_model=EstimateObject)
def create_estimate(body: JobCreate, tenant: CurrentTenant, session: SessionDep) -> EstimateObject:
    """Same body as a job; nothing is created."""
    model, source = jobs.resolve_model(session, tenant_id=tenant.id, name=body.model)
    train = files.get_file(
        session, tenant_id=tenant.id, file_id=body.training_file, param="training_file"
    )
    spec = jobs.build_spec(body, source=source, train_rows=train.rows, model=model)
    result, queue = jobs.estimate(model, spec)
    parts = {
        k: v
        for k, v in jobs.estimate_dict(result).items()
        if k.endswith("_bytes") and k not in ("total_bytes", "compute_bytes")  # not parts
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


# --------------------------------------------------------------------------- merges


@router.post("/v1/adapters/{adapter_id}/merge", response_model=merges.MergeObject, status_code=202)
def create_merge(
    request: Request,
    adapter_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    body: merges.MergeCreate | None = None,
) -> merges.MergeObject:
    """Merge the adapter into its base (a task on a worker of the adapter's GPU class); the
    same adapter and dtype again returns the merge already queued, running or succeeded."""
    dtype = (body or merges.MergeCreate()).dtype
    row, message = merges.create_merge(
        session, tenant_id=tenant.id, adapter_id=adapter_id, dtype=dtype
    )
    obj = merges.MergeObject.of(row)
    session.commit()
    if message is not None:
        try:
            relay_outbox(request, message.id)
        except Exception:  # committed: the sweeper relays the message
            log.warning("relay after commit failed; the sweeper publishes merge %s", row.id)
    return obj


@router.get("/v1/adapters/{adapter_id}/merges", response_model=merges.MergeList)
def list_merges(adapter_id: str, tenant: CurrentTenant, session: SessionDep) -> merges.MergeList:
    rows = merges.list_merges(session, tenant_id=tenant.id, adapter_id=adapter_id)
    return merges.MergeList(data=[merges.MergeObject.of(r) for r in rows])


@router.get("/v1/merges/{merge_id}", response_model=merges.MergeObject)
def get_merge(merge_id: str, tenant: CurrentTenant, session: SessionDep) -> merges.MergeObject:
    return merges.MergeObject.of(merges.get_merge(session, tenant_id=tenant.id, merge_id=merge_id))


@router.get("/v1/merges/{merge_id}/download")
def download_merge(
    request: Request,
    merge_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    store: StoreDep,
    redirect: bool = False,
) -> Response:
    """The merged model folder as a .tar.gz (`model/…`); `?redirect=true` answers 307 to a
    presigned URL that expires within 15 minutes. 409 `merge_not_ready` until it succeeded."""
    key = merges.archive_key(session, tenant_id=tenant.id, merge_id=merge_id)
    return archive_response(request, store, key, filename=f"{merge_id}.tar.gz", redirect=redirect)


@router.delete("/v1/merges/{merge_id}", response_model=merges.MergeDeleted)
def delete_merge(
    request: Request, merge_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> merges.MergeDeleted:
    row = merges.delete_merge(session, tenant_id=tenant.id, merge_id=merge_id)
    session.commit()
    try:  # post-commit; what the store refuses now the sweeper deletes later
        retention.drain_deletions(request.app.state.sessions, store, limit=20)
    except Exception as exc:
        log.warning("merge %s: object deletion deferred (%s)", row.id, type(exc).__name__)
    return merges.MergeDeleted(id=row.id)
