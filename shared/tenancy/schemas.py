from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import RegisteredModel, Tenant


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="Display name of the customer.")
    max_running_jobs: int = Field(2, ge=1, le=1000)
    max_queued_jobs: int = Field(20, ge=1, le=100000)


class TenantObject(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    max_running_jobs: int
    max_queued_jobs: int
    created_at: int

    @classmethod
    def of(cls, row: Tenant) -> TenantObject:
        return cls(
            id=row.id,
            name=row.name,
            max_running_jobs=row.max_running_jobs,
            max_queued_jobs=row.max_queued_jobs,
            created_at=int(row.created_at.timestamp()),
        )


class KeyIssued(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant_id: str
    key: str = Field(description="The secret. Shown once; only its SHA-256 is stored.")
    prefix: str


class KeyRevoked(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    revoked: bool = True


class ModelRegister(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$",
        description="Name tenants use in `model`.",
    )
    source: str = Field(
        min_length=1, max_length=1000, description="Local folder of safetensors weights, or hub id."
    )
    revision: str | None = Field(None, max_length=100, description="Hub revision (commit).")
    config: dict[str, Any] | None = Field(
        None, description="The model's config.json, for hub models (read from disk otherwise)."
    )


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "system"
    name: str
    source: str
    revision: str | None
    config: dict[str, Any] | None = None

    @classmethod
    def of(cls, row: RegisteredModel) -> ModelObject:
        return cls(
            id=row.name,
            created=int(row.created_at.timestamp()),
            name=row.name,
            source=row.source,
            revision=row.revision,
            config=row.config,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
    has_more: bool = False
