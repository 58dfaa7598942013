from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, BigIntPK, utcnow


class Job(Base):
    """A fine-tuning job. `status` moves only through `shared.jobs.states`."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    status: Mapped[str] = mapped_column(String(32), default="validating_files")
    spec: Mapped[dict[str, Any]]
    hyperparameters: Mapped[dict[str, Any]]
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int]
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", default=None)
    gpu_class: Mapped[str] = mapped_column(String(16))
    estimate: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)
    # Lease: which worker holds the job and until when; attempt counts claims.
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Asked while running: the worker checkpoints at its next step and moves the job to paused.
    pause_requested: Mapped[bool] = mapped_column(default=False)
    # File ids of what the run produced for the tenant (the results CSV), OpenAI's result_files.
    result_files: Mapped[list[Any] | None] = mapped_column(default=None)
    # Experiment tracking the job asked for (OpenAI's `integrations`: W&B, and MLflow).
    integrations: Mapped[list[Any] | None] = mapped_column(default=None)
    # Progress, written by the worker's hooks.
    step: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int | None] = mapped_column(default=None)
    loss: Mapped[float | None] = mapped_column(default=None)
    eval_loss: Mapped[float | None] = mapped_column(default=None)
    tokens_per_second: Mapped[float | None] = mapped_column(default=None)
    eta_seconds: Mapped[float | None] = mapped_column(default=None)
    trained_tokens: Mapped[int | None] = mapped_column(default=None)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), default=None)
    adapter_id: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    """An OpenAI-shaped job event; `seq` orders events and is the SSE event id."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    step: Mapped[int]
    # The claim that wrote it; objects live under that attempt's own prefix.
    attempt: Mapped[int] = mapped_column(default=0)
    metrics: Mapped[dict[str, Any]]
    storage_prefix: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(String(40), unique=True)
    base_model: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(300), unique=True)
    storage_prefix: Mapped[str] = mapped_column(String(255))
    metrics: Mapped[dict[str, Any]]
    spec: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """First answer to a (tenant, Idempotency-Key) request, kept 24 hours."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(default=None)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class OutboxMessage(Base):
    """A Celery message to publish after commit; the sweeper republishes unsent ones.

    `available_at` defers a message (a job waiting for its tenant's running slot, or backing
    off after a transient fault): the relay sends it no earlier than that."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    queue: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    available_at: Mapped[datetime | None] = mapped_column(default=None)
    sent_at: Mapped[datetime | None] = mapped_column(default=None, index=True)
    attempts: Mapped[int] = mapped_column(default=0)


class ObjectDeletion(Base):
    """A store prefix to delete, written in the same transaction that dropped its record.

    Deleting objects is post-commit work: it is tried right after the commit and retried by
    the sweeper until it succeeds, so a store outage never turns a committed delete into a 5xx
    or leaves objects behind for good."""

    __tablename__ = "object_deletions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(default=0)


class Worker(Base):
    """A worker process announcing itself: what it consumes, what it can hold, when last seen."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the lease owner name
    hostname: Mapped[str] = mapped_column(String(200))
    queues: Mapped[list[Any]]
    device: Mapped[str] = mapped_column(String(64))
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    current_job_id: Mapped[str | None] = mapped_column(String(40), default=None)
