"""ORM models. Import from here so that every table is registered on `Base.metadata`."""

from shared.models.base import Base, utcnow
from shared.models.files import File, RegisteredModel
from shared.models.jobs import Adapter, Checkpoint, IdempotencyKey, Job, JobEvent, OutboxMessage
from shared.models.tenancy import ApiKey, Tenant

__all__ = [
    "Adapter",
    "ApiKey",
    "Base",
    "Checkpoint",
    "File",
    "IdempotencyKey",
    "Job",
    "JobEvent",
    "OutboxMessage",
    "RegisteredModel",
    "Tenant",
    "utcnow",
]
