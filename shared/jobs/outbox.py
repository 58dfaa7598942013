"""The outbox: Celery messages written in the same transaction as the state they announce.

A row is published after its transaction commits (by the API right away, by the beat's relay
otherwise). `available_at` defers a row: a job waiting for its tenant's running slot or backing
off after a transient fault is re-offered no earlier than that, at a bounded rate, and never
by a message that republishes itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from shared.models import Job, OutboxMessage, utcnow

log = logging.getLogger(__name__)
GRACE = timedelta(seconds=5)  # leave fresh rows to the publisher that wrote them
BATCH = 500


def enqueue(
    session: Session, job: Job, *, delay_s: float = 0.0, caller_sends: bool = False
) -> OutboxMessage:
    """A message for `job` on its queue, sent no earlier than `delay_s` from now.

    With `caller_sends` (the API, which publishes right after its commit) the relay leaves the
    row alone for the grace period; rows nobody else sends (the sweeper's requeues, a worker's
    release) are due at once."""
    row = OutboxMessage(
        job_id=job.id,
        queue=job.gpu_class,
        available_at=None if caller_sends else utcnow() + timedelta(seconds=delay_s),
    )
    session.add(row)
    session.flush()
    return row


def has_pending(session: Session, job_id: str) -> bool:
    """Is a message for the job still waiting to be sent?"""
    count = session.scalar(
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.job_id == job_id, OutboxMessage.sent_at.is_(None))
    )
    return bool(count)


def due(session: Session, *, now: datetime | None = None) -> list[OutboxMessage]:
    """Unsent rows whose time has come (fresh undelayed rows wait out the grace period)."""
    now = now or utcnow()
    ready = or_(
        and_(OutboxMessage.available_at.is_(None), OutboxMessage.created_at <= now - GRACE),
        OutboxMessage.available_at <= now,
    )
    return list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.sent_at.is_(None), ready)
            .order_by(OutboxMessage.id)
            .limit(BATCH)
        )
    )


def publish(
    session: Session, rows: list[OutboxMessage], send: Callable[[str, str], None]
) -> list[int]:
    """Send each row's message; a failure leaves the row (and the rest) for the next relay."""
    sent: list[int] = []
    for row in rows:
        row.attempts += 1
        try:
            send(row.job_id, row.queue)
        except Exception as exc:
            log.warning(
                "could not publish job %s to %s (%s); it stays in the outbox",
                row.job_id,
                row.queue,
                type(exc).__name__,
            )
            break  # the broker is down: stop trying until the next relay
        row.sent_at = utcnow()
        sent.append(row.id)
    session.flush()
    return sent


def wake_waiting(session: Session, *, tenant_id: str) -> int:
    """A running slot of the tenant freed up: offer its deferred queued jobs now."""
    now = utcnow()
    waiting = select(Job.id).where(Job.tenant_id == tenant_id, Job.status == "queued")
    result = session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.sent_at.is_(None),
            OutboxMessage.available_at > now,
            OutboxMessage.job_id.in_(waiting),
        )
        .values(available_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def prune_sent(session: Session, *, older_than: timedelta) -> int:
    """Delete rows sent longer ago than `older_than` (the broker has had them for long)."""
    result = session.execute(
        delete(OutboxMessage)
        .where(OutboxMessage.sent_at.is_not(None), OutboxMessage.sent_at < utcnow() - older_than)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
