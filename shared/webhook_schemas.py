"""Request and response bodies of `/v1/webhooks` (separate from the ORM rows they show)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import WebhookDelivery, WebhookEndpoint


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="http(s) URL that receives a POST per event.")
    events: list[str] | None = Field(
        None, max_length=20, description="Event types to send; omitted: every type."
    )
    description: str | None = Field(None, max_length=512)


class WebhookObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    disabled: bool
    created_at: int

    @classmethod
    def of(cls, row: WebhookEndpoint) -> WebhookObject:
        return cls(
            id=row.id,
            url=row.url,
            events=list(row.event_types),
            description=row.description,
            disabled=row.disabled,
            created_at=int(row.created_at.timestamp()),
        )


class WebhookCreated(WebhookObject):
    """The creation answer: the only one that carries the signing secret."""

    secret: str = Field(description="Standard Webhooks signing secret (`whsec_…`), shown once.")

    @classmethod
    def of_new(cls, row: WebhookEndpoint) -> WebhookCreated:
        return cls(**WebhookObject.of(row).model_dump(), secret=row.secret)


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookObject]
    has_more: bool


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class DeliveryObject(BaseModel):
    id: str = Field(description="Also the `webhook-id` header of every attempt.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    webhook_id: str
    event_id: str
    event_type: str
    job_id: str | None
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    last_attempt_at: int | None
    next_attempt_at: int | None
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryObject:
        return cls(
            id=row.id,
            webhook_id=row.endpoint_id,
            event_id=row.event_id,
            event_type=row.event_type,
            job_id=row.job_id,
            status=row.status,
            attempts=row.attempts,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=int(row.created_at.timestamp()),
            last_attempt_at=_ts(row.last_attempt_at),
            next_attempt_at=_ts(row.next_attempt_at) if row.status == "pending" else None,
            payload=row.payload,
        )


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryObject]
    has_more: bool
