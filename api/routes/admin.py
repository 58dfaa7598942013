"""`/admin`: tenants, keys and the base-model registry; admin key only."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminDep, SessionDep
from shared.tenancy import service
from shared.tenancy.schemas import (
    KeyIssued,
    KeyRevoked,
    ModelList,
    ModelObject,
    ModelRegister,
    TenantCreate,
    TenantObject,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.post("/tenants", response_model=TenantObject, status_code=201)
def create_tenant(body: TenantCreate, session: SessionDep) -> TenantObject:
    tenant = service.create_tenant(session, name=body.name)
    tenant.max_running_jobs = body.max_running_jobs
    tenant.max_queued_jobs = body.max_queued_jobs
    session.flush()
    return TenantObject.of(tenant)


@router.post("/tenants/{tenant_id}/keys", response_model=KeyIssued, status_code=201)
def create_key(tenant_id: str, session: SessionDep) -> KeyIssued:
    issued = service.create_key(session, tenant_id=tenant_id)
    return KeyIssued(id=issued.id, tenant_id=tenant_id, key=issued.key, prefix=issued.prefix)


@router.delete("/keys/{key_id}", response_model=KeyRevoked)
def revoke_key(key_id: str, session: SessionDep) -> KeyRevoked:
    return KeyRevoked(id=service.revoke_key(session, key_id=key_id).id)


@router.post("/models", response_model=ModelObject, status_code=201)
def register_model(body: ModelRegister, session: SessionDep) -> ModelObject:
    row = service.register_model(
        session,
        name=body.name,
        source=body.source,
        revision=body.revision,
        config=body.config,
    )
    return ModelObject.of(row)


@router.get("/models", response_model=ModelList)
def list_models(session: SessionDep) -> ModelList:
    return ModelList(data=[ModelObject.of(m) for m in service.list_models(session)])
