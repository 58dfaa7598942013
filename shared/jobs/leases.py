"""The sweeper's side of leases: recover jobs whose worker stopped renewing.

The broker is a wake-up call; the database decides. A worker claims a job and keeps it by
renewing its lease from a heartbeat thread (`shared.jobs.runs`). A worker that dies or freezes
stops renewing; the sweeper then requeues the job (or fails it once its attempts are spent).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from shared.jobs import outbox, runs
from shared.jobs.states import JobStatus, set_status
from shared.models import IdempotencyKey, Job, OutboxMessage, utcnow

log = logging.getLogger(__name__)
REPUBLISH_QUEUED_AFTER = timedelta(minutes=10)
IDLE_REPUBLISH_AFTER = timedelta(seconds=30)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass
class SweepReport:
    requeued: list[str]
    failed: list[str]
    cancelled: list[str]
    republished: list[str]
    published: list[int]
    expired_keys: int


def sweep_leases(session: Session) -> tuple[list[str], list[str], list[str]]:
    """Requeue running jobs whose lease expired, or fail those out of attempts."""
    now = utcnow()
    requeued: list[str] = []
    failed: list[str] = []
    cancelled: list[str] = []
    expired = session.scalars(
        select(Job).where(Job.status == "running", Job.lease_expires_at < now)
    ).all()
    for job in expired:
        still_expired = and_(Job.lease_expires_at < now, Job.lease_owner == job.lease_owner)
        lost = f"worker {job.lease_owner} stopped renewing its lease"
        if job.cancel_requested:
            if set_status(
                session,
                job,
                JobStatus.CANCELLED,
                message=f"Job cancelled ({lost})",
                extra_where=still_expired,
            ):
                cancelled.append(job.id)
        elif job.attempt < job.max_attempts:
            if set_status(
                session,
                job,
                JobStatus.QUEUED,
                level="warn",
                extra_where=still_expired,
                message=f"{lost.capitalize()}; requeued after attempt {job.attempt} "
                f"of {job.max_attempts}",
                lease_owner=None,
                lease_expires_at=None,
            ):
                outbox.enqueue(session, job)
                requeued.append(job.id)
        elif set_status(
            session,
            job,
            JobStatus.FAILED,
            level="error",
            extra_where=still_expired,
            message=f"Job failed: {lost} on all {job.max_attempts} attempts",
            error_code="max_attempts_exceeded",
            error_message=f"{lost} on each of {job.max_attempts} attempts",
        ):
            failed.append(job.id)
    for job in expired:
        outbox.wake_waiting(session, tenant_id=job.tenant_id)
        if job.id in failed or job.id in cancelled:
            runs.forget_unrecorded_adapters(session, job)
    session.flush()
    return requeued, failed, cancelled


def republish_stale_queued(session: Session, *, idle_queues: Collection[str] = ()) -> list[str]:
    """A queued job whose last message is old may have lost it (a broker restart, a worker
    killed while holding a prefetched delivery): resend. Old means `REPUBLISH_QUEUED_AFTER`,
    or only `IDLE_REPUBLISH_AFTER` when a live worker serving the job's queue sits idle, which
    a job still waiting for its message contradicts. A duplicate is harmless: the claim decides."""
    now = utcnow()
    last_sent = (
        select(func.max(OutboxMessage.sent_at))
        .where(OutboxMessage.job_id == Job.id)
        .scalar_subquery()
    )
    pending = (
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.job_id == Job.id, OutboxMessage.sent_at.is_(None))
        .scalar_subquery()
    )

    def older_than(age: timedelta) -> ColumnElement[bool]:
        return and_(Job.updated_at < now - age, last_sent < now - age)

    old = older_than(REPUBLISH_QUEUED_AFTER)
    if idle_queues:
        old = or_(
            old, and_(Job.gpu_class.in_(sorted(idle_queues)), older_than(IDLE_REPUBLISH_AFTER))
        )
    stale = session.scalars(select(Job).where(Job.status == "queued", pending == 0, old)).all()
    for job in stale:
        outbox.enqueue(session, job)
        job.updated_at = now
    session.flush()
    return [job.id for job in stale]


def expire_idempotency_keys(session: Session) -> int:
    rows = session.scalars(select(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow())).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)
