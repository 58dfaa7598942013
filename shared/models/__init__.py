"""ORM models. Import from here so that every table is registered on `Base.metadata`."""

from shared.models.base import Base, utcnow
from shared.models.files import File, RegisteredModel
from shared.models.jobs import (
    Adapter,
    Checkpoint,
    IdempotencyKey,
    Job,
    JobEvent,
    ObjectDeletion,
    OutboxMessage,
    Worker,
)
from shared.models.merges import Merge
from shared.models.tenancy import ApiKey, Tenant
from shared.models.webhooks import WebhookDelivery, WebhookEndpoint

__all__ = [
    "Adapter",
    "ApiKey",
    "Base",
    "Checkpoint",
    "File",
    "IdempotencyKey",
    "Job",
    "JobEvent",
    "Merge",
    "ObjectDeletion",
    "OutboxMessage",
    "RegisteredModel",
    "Tenant",
    "WebhookDelivery",
    "WebhookEndpoint",
    "Worker",
    "utcnow",
]
