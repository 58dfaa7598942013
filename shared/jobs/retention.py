"""What stays in the store: the newest K checkpoints of a job plus its best by eval loss.

Rows and objects go together: a dropped row's prefix is written to `object_deletions` in the
same transaction, and the objects are deleted after the commit (retried by the sweeper until
the store takes it). A reader never finds a row whose objects were deleted first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.models import Checkpoint, ObjectDeletion
from shared.storage import ObjectStore, check_key, check_prefix

log = logging.getLogger(__name__)


def _eval_loss(row: Checkpoint) -> float | None:
    value = (row.metrics or {}).get("valid_loss")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def checkpoints_to_keep(rows: Iterable[Checkpoint], keep_last: int) -> set[str]:
    """Ids of the newest `keep_last` checkpoints by step plus the one with the lowest eval loss."""
    ordered = sorted(rows, key=lambda r: r.step, reverse=True)
    keep = {r.id for r in ordered[:keep_last]}
    scored = [(loss, r.step, r.id) for r in ordered if (loss := _eval_loss(r)) is not None]
    if scored:
        keep.add(min(scored)[2])
    return keep


def schedule_deletion(session: Session, prefix: str) -> None:
    """Delete everything under `prefix` after the caller's commit."""
    session.add(ObjectDeletion(prefix=check_prefix(prefix)))


def schedule_object_deletion(session: Session, key: str) -> None:
    """Delete the one object `key` after the caller's commit (a value without the trailing
    slash of a prefix)."""
    session.add(ObjectDeletion(prefix=check_key(key)))


def drop_checkpoints(session: Session, rows: Iterable[Checkpoint]) -> int:
    """Delete checkpoint rows and schedule their objects' deletion, in the caller's transaction."""
    count = 0
    for row in rows:
        schedule_deletion(session, row.storage_prefix)
        session.delete(row)
        count += 1
    session.flush()
    return count


def prune_job_checkpoints(session: Session, *, job_id: str, keep_last: int) -> int:
    rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
    keep = checkpoints_to_keep(rows, keep_last)
    return drop_checkpoints(session, [r for r in rows if r.id not in keep])


def drain_deletions(
    sessions: sessionmaker[Session], store: ObjectStore, *, limit: int = 200
) -> int:
    """Delete scheduled prefixes and keys from the store; rows that failed stay for next time."""
    with sessions.begin() as session:
        pending = [
            (row.id, row.prefix)
            for row in session.scalars(
                select(ObjectDeletion).order_by(ObjectDeletion.id).limit(limit)
            )
        ]
    done = 0
    for row_id, prefix in pending:
        try:
            if prefix.endswith("/"):
                store.delete_prefix(prefix)
            else:
                store.delete(prefix)
        except Exception as exc:  # the store is down: the row stays, the sweeper retries
            log.warning("could not delete %s (%s); will retry", prefix, type(exc).__name__)
            with sessions.begin() as session:
                row = session.get(ObjectDeletion, row_id)
                if row is not None:
                    row.attempts += 1
            break
        with sessions.begin() as session:
            row = session.get(ObjectDeletion, row_id)
            if row is not None:
                session.delete(row)
        done += 1
    return done
