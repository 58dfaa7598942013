"""Job events: rows in `job_events` (the record) and, after commit, a Redis pub/sub nudge.

Subscribers never trust the nudge's payload alone: they re-read the table from their last
seen `seq`, so a dropped pub/sub message delays an event but never loses or repeats it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Job, JobEvent

log = logging.getLogger(__name__)
_PENDING_KEY = "qlora_pending_event_jobs"
_redis_url: str | None = None
_redis_client: Any = None


def channel(job_id: str) -> str:
    return f"qlora:job-events:{job_id}"


def configure_publisher(redis_url: str | None) -> None:
    """Called once per process with `Settings.redis_url` (None: no live push, pollers only)."""
    global _redis_url, _redis_client
    _redis_url, _redis_client = redis_url, None


def _client() -> Any:
    global _redis_client
    if _redis_url and _redis_client is None:
        import redis

        _redis_client = redis.Redis.from_url(_redis_url, socket_timeout=2, socket_connect_timeout=2)
    return _redis_client


def record_event(
    session: Session,
    job: Job,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    # Lock the job row first: events of one job then commit in `seq` order, so a reader that
    # resumes after seq N can never miss a smaller seq committed later.
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update())
    row = JobEvent(
        job_id=job.id, tenant_id=job.tenant_id, level=level, type=type, message=message, data=data
    )
    session.add(row)
    session.flush()
    session.info.setdefault(_PENDING_KEY, set()).add(job.id)
    return row


@sa_event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    jobs = session.info.pop(_PENDING_KEY, None)
    if not jobs or not _redis_url:
        return
    try:
        client = _client()
        for job_id in jobs:
            client.publish(channel(job_id), json.dumps({"job_id": job_id}))
    except Exception as exc:  # live push is best effort; the table is the record
        log.warning("could not publish job events to Redis: %s", exc)


@sa_event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)
