"""Leases: which worker holds a running job, and the sweeper that recovers lost ones.

The broker is a wake-up call; the database decides. A worker claims a job with one conditional
UPDATE and keeps it by renewing the lease from its progress hook. A worker that dies stops
renewing; the sweeper then requeues the job (or fails it once its attempts are spent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from shared.events import record_event
from shared.jobs.states import JobStatus, check_transition, set_status
from shared.models import IdempotencyKey, Job, OutboxMessage, Tenant, utcnow

log = logging.getLogger(__name__)
OUTBOX_GRACE = timedelta(seconds=5)  # leave fresh rows to the publisher that wrote them
REPUBLISH_QUEUED_AFTER = timedelta(minutes=10)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool


def claim_job(session: Session, *, job_id: str, owner: str, lease_seconds: float) -> Job | None:
    """Take `job_id` if it is queued (or running on an expired lease), attempts remain, and
    the tenant is under its running-jobs limit. Returns the job, or None if another worker
    has it, it is finished or cancelled, or it must wait its turn."""
    check_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.RUNNING)
    now = utcnow()
    previous = session.scalar(select(Job.status).where(Job.id == job_id))
    other = aliased(Job)
    running_elsewhere = (
        select(func.count())
        .select_from(other)
        .where(other.tenant_id == Job.tenant_id, other.status == "running", other.id != Job.id)
        .scalar_subquery()
    )
    tenant_limit = (
        select(Tenant.max_running_jobs).where(Tenant.id == Job.tenant_id).scalar_subquery()
    )
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
            or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)),
            running_elsewhere < tenant_limit,
        )
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get(Job, job_id)
    assert job is not None
    session.refresh(job)
    record_event(
        session,
        job,
        f"Worker {owner} started attempt {job.attempt} of {job.max_attempts}",
        data={"status": "running", "from": previous, "attempt": job.attempt, "worker": owner},
    )
    return job


def is_waiting_turn(session: Session, *, job_id: str) -> bool:
    """After a lost claim: is the job still claimable later (held back by the tenant's limit)?"""
    job = session.get(Job, job_id)
    return (
        job is not None
        and job.status == "queued"
        and not job.cancel_requested
        and job.attempt < job.max_attempts
    )


def renew_lease(
    session: Session, *, job_id: str, owner: str, lease_seconds: float, progress: dict[str, Any]
) -> LeaseState:
    """Extend the lease and write progress in one UPDATE; tells whether we still hold it."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now, **progress)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return LeaseState(held=False, cancel_requested=False)
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return LeaseState(held=True, cancel_requested=bool(cancel))


def _owned(owner: str) -> Any:
    return Job.lease_owner == owner


def finish(
    session: Session,
    job: Job,
    *,
    owner: str,
    target: JobStatus,
    message: str,
    level: str = "info",
    **fields: Any,
) -> bool:
    """Move a job this worker holds to a final state (or back to queued on release)."""
    values = dict(fields)
    if target is JobStatus.QUEUED:
        # A graceful release (preemption) is not the job's failure: it gets its attempt back
        # as an extra one, so `attempt` still counts claims and crashes stay bounded.
        values.update(lease_owner=None, lease_expires_at=None, max_attempts=job.max_attempts + 1)
    moved = set_status(
        session,
        job,
        target,
        message=message,
        expect=JobStatus.RUNNING,
        extra_where=_owned(owner),
        level=level,
        **values,
    )
    if moved and target is JobStatus.QUEUED:
        session.add(OutboxMessage(job_id=job.id, queue=job.gpu_class))
        session.flush()
    return moved


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
                session.add(OutboxMessage(job_id=job.id, queue=job.gpu_class))
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
    session.flush()
    return requeued, failed, cancelled


def republish_stale_queued(session: Session) -> list[str]:
    """A queued job whose last message is old may have lost it (broker restart): resend."""
    cutoff = utcnow() - REPUBLISH_QUEUED_AFTER
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
    stale = session.scalars(
        select(Job).where(
            Job.status == "queued", Job.updated_at < cutoff, last_sent < cutoff, pending == 0
        )
    ).all()
    for job in stale:
        session.add(OutboxMessage(job_id=job.id, queue=job.gpu_class))
        job.updated_at = utcnow()
    session.flush()
    return [job.id for job in stale]


def unsent_outbox(session: Session, *, min_age: timedelta = OUTBOX_GRACE) -> list[OutboxMessage]:
    cutoff = utcnow() - min_age
    return list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), OutboxMessage.created_at <= cutoff)
            .order_by(OutboxMessage.id)
            .limit(500)
        )
    )


def publish_outbox(
    session: Session, rows: list[OutboxMessage], publish: Callable[[str, str], None]
) -> list[int]:
    """Send each row's message; a failure leaves the row for the next sweep."""
    sent: list[int] = []
    for row in rows:
        row.attempts += 1
        try:
            publish(row.job_id, row.queue)
        except Exception as exc:
            log.warning(
                "could not publish job %s to %s: %s: %s",
                row.job_id,
                row.queue,
                type(exc).__name__,
                exc,
            )
            session.flush()
            break  # the broker is down: stop trying until the next sweep
        row.sent_at = utcnow()
        sent.append(row.id)
    session.flush()
    return sent


def expire_idempotency_keys(session: Session) -> int:
    rows = session.scalars(select(IdempotencyKey).where(IdempotencyKey.expires_at < utcnow())).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)
