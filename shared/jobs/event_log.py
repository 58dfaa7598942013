"""Reads of one job's event log for streaming: where it ends, a page of it in order, and the
job's status. The API's event hub calls these; they never write."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.models import Job, JobEvent

PAGE_SIZE = 500


def newest_seq(session: Session, *, job_id: str) -> int:
    """The `seq` of the job's newest event, 0 when it has none."""
    value = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    return int(value or 0)


def events_after(
    session: Session, *, job_id: str, after: int, upto: int | None = None, limit: int = PAGE_SIZE
) -> list[JobEvent]:
    """One page of the job's events with `after < seq <= upto`, oldest first."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after)
    if upto is not None:
        query = query.where(JobEvent.seq <= upto)
    return list(session.scalars(query.order_by(JobEvent.seq).limit(limit)))


def job_status(session: Session, *, job_id: str) -> str | None:
    """The job's status, None when the job is gone."""
    status: str | None = session.scalar(select(Job.status).where(Job.id == job_id))
    return status
