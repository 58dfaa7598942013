"""The job state machine: one transitions table, one conditional `set_status`.

No code assigns `Job.status`: every change is `UPDATE … WHERE id = :id AND status = :from`, so
two processes racing for the same transition cannot both win, and an illegal move raises.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.errors import Conflict
from shared.events import record_event
from shared.models import Job, utcnow


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.FAILED, S.CANCELLED}),
    # running -> running is a re-claim after an expired lease; running -> queued a release;
    # running -> paused the worker's checkpoint-and-release after a pause request.
    S.RUNNING: frozenset({S.RUNNING, S.QUEUED, S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    # paused -> queued is a resume: the next claim continues from the last checkpoint.
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED})
ACTIVE = frozenset({S.VALIDATING_FILES, S.QUEUED, S.RUNNING, S.PAUSED})


class IllegalTransition(Conflict):
    code = "illegal_transition"


def check_transition(current: str, target: JobStatus) -> None:
    if target not in TRANSITIONS[JobStatus(current)]:
        raise IllegalTransition(f"a {current} job cannot become {target.value}")


def set_status(
    session: Session,
    job: Job,
    target: JobStatus,
    *,
    message: str,
    expect: JobStatus | Collection[JobStatus] | None = None,
    extra_where: Any = None,
    level: str = "info",
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move `job` to `target` if it is still in `expect` (default: its loaded status).

    Returns False when another process changed the job first (the caller lost a race); raises
    `IllegalTransition` when a move is not in the table. Records a state-change event and, in
    the same transaction, the webhook deliveries announcing it (`shared.webhooks`).
    """
    if expect is None:
        sources = [JobStatus(job.status)]
    elif isinstance(expect, JobStatus):
        sources = [expect]
    else:
        sources = list(expect)
    for source in sources:
        check_transition(source, target)
    previous = job.status if job.status in sources else sources[0].value
    now: datetime = utcnow()
    values: dict[str, Any] = {"status": target.value, "updated_at": now, **fields}
    if target in TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    stmt = update(Job).where(Job.id == job.id, Job.status.in_([s.value for s in sources]))
    if extra_where is not None:
        stmt = stmt.where(extra_where)
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.refresh(job)
    record_event(
        session,
        job,
        message,
        level=level,
        data={"status": target.value, "from": previous, **(data or {})},
    )
    if target.value != previous:  # a re-claim (running -> running) is no news to a receiver
        webhooks.enqueue_job_event(session, job, target.value)
    return True
