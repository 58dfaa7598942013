"""`/v1/webhooks`: a tenant's webhook endpoints and their deliveries (docs/webhooks.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentTenant, SessionDep, SettingsDep
from shared import webhooks
from shared.webhook_schemas import (
    DeliveryList,
    DeliveryObject,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
    WebhookObject,
)

router = APIRouter(tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/v1/webhooks", response_model=WebhookCreated)
def create_webhook(
    body: WebhookCreate, tenant: CurrentTenant, session: SessionDep, settings: SettingsDep
) -> WebhookCreated:
    """Register an endpoint; the answer carries its signing secret, shown this once."""
    row = webhooks.create_endpoint(
        session,
        tenant_id=tenant.id,
        url=body.url,
        events=body.events,
        description=body.description,
        settings=settings,
    )
    return WebhookCreated.of_new(row)


@router.get("/v1/webhooks", response_model=WebhookList)
def list_webhooks(
    tenant: CurrentTenant, session: SessionDep, after: str | None = None, limit: Limit = 20
) -> WebhookList:
    rows, has_more = webhooks.list_endpoints(session, tenant_id=tenant.id, after=after, limit=limit)
    return WebhookList(data=[WebhookObject.of(r) for r in rows], has_more=has_more)


@router.get("/v1/webhooks/{webhook_id}", response_model=WebhookObject)
def get_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookObject:
    return WebhookObject.of(
        webhooks.get_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    )


@router.delete("/v1/webhooks/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(webhook_id: str, tenant: CurrentTenant, session: SessionDep) -> WebhookDeleted:
    row = webhooks.delete_endpoint(session, tenant_id=tenant.id, endpoint_id=webhook_id)
    return WebhookDeleted(id=row.id)


@router.get("/v1/webhooks/{webhook_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    webhook_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
) -> DeliveryList:
    """Newest first: status, attempts, the last HTTP status code and error of each."""
    rows, has_more = webhooks.list_deliveries(
        session, tenant_id=tenant.id, endpoint_id=webhook_id, after=after, limit=limit
    )
    return DeliveryList(data=[DeliveryObject.of(r) for r in rows], has_more=has_more)
