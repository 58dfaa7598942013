"""Merged exports of adapters: create (idempotent), read, list, delete; and the worker's verbs.

A merge folds an adapter into its base model (`worker.training.merge`) on a worker of the
adapter's job's GPU class, and stores a plain 16-bit model under
`merged/{tenant_id}/{merge_id}/` with `model.tar.gz`, its archive. Its message goes through the
transactional outbox like a job's (the outbox row's `job_id` holds the merge id; the publisher
tells the two apart by the id's prefix).

States: queued -> running -> succeeded | failed. `attempts` counts claims and fences every
write of a worker: a worker that lost its claim (the merge was deleted, or re-sent after the
worker stopped heartbeating) writes nothing. A merge left `running` by a dead worker is re-sent
by the sweeper (`recover_stale`) once its heartbeat (`updated_at`) is older than the timeout;
after `MAX_ATTEMPTS` claims it fails with `merge_worker_lost`. Services flush; callers commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from shared import adapters
from shared.broker import CPU_QUEUE
from shared.errors import Conflict, NotFound
from shared.ids import new_id
from shared.jobs import retention
from shared.models import Adapter, File, Job, Merge, OutboxMessage, RegisteredModel, utcnow
from shared.storage import check_prefix

MergeDtype = Literal["bfloat16", "float16"]
ARCHIVE_NAME = "model.tar.gz"
MAX_ATTEMPTS = 3
ACTIVE = ("queued", "running")
REPUBLISH_QUEUED_AFTER = timedelta(minutes=10)

# code -> what the tenant is told (never paths or exception text; details go to the log).
PUBLIC_MESSAGES: dict[str, str] = {
    "base_model_unavailable": "The adapter's base model is no longer registered or could not "
    "be read; ask the operators to register it again, then request the merge again.",
    "adapter_unavailable": "The adapter's files could not be read from the store.",
    "merge_unsupported": "This adapter cannot be merged: {detail}",
    "out_of_memory": "The merge ran out of memory on its worker.",
    "transient_retries_exhausted": "A dependency (object store, database or broker) stayed "
    "unavailable on every attempt; request the merge again once the service is healthy.",
    "merge_worker_lost": "The merge's worker stopped responding on every attempt.",
    "internal_error": "An internal error stopped the merge; the operators have the details "
    "(quote the merge id).",
}


def public_message(code: str, detail: str = "") -> str:
    template = PUBLIC_MESSAGES[code]
    return template.format(detail=detail) if "{detail}" in template else template


def merged_prefix(tenant_id: str, merge_id: str) -> str:
    return check_prefix(f"merged/{tenant_id}/{merge_id}")


# --------------------------------------------------------------------------- API schemas


class MergeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: MergeDtype = Field(
        default="bfloat16", description="Dtype of the merged weights: bfloat16 or float16."
    )


class MergeError(BaseModel):
    code: str
    message: str


class MergeObject(BaseModel):
    id: str
    object: Literal["adapter.merge"] = "adapter.merge"
    adapter_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    dtype: MergeDtype
    parity: dict[str, Any] | None
    error: MergeError | None
    created_at: int
    finished_at: int | None

    @classmethod
    def of(cls, row: Merge) -> MergeObject:
        error = None
        if row.error_code is not None:
            error = MergeError(code=row.error_code, message=row.error_message or "")
        return cls(
            id=row.id,
            adapter_id=row.adapter_id,
            status=row.status,
            dtype=row.dtype,
            parity=row.parity,
            error=error,
            created_at=int(row.created_at.timestamp()),
            finished_at=int(row.finished_at.timestamp()) if row.finished_at else None,
        )


class MergeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MergeObject]
    has_more: bool = False


class MergeDeleted(BaseModel):
    id: str
    object: Literal["adapter.merge"] = "adapter.merge"
    deleted: bool = True


# --------------------------------------------------------------------------- tenant verbs


def create_merge(
    session: Session, *, tenant_id: str, adapter_id: str, dtype: str
) -> tuple[Merge, OutboxMessage | None]:
    """Queue a merge of the tenant's adapter, or return the one already queued, running or
    succeeded for the same adapter and dtype (then no message: it needs none)."""
    adapter = session.scalar(
        select(Adapter).where(Adapter.id == adapter_id).with_for_update()
    )  # serializes concurrent requests for one adapter (Postgres; SQLite's writer is single)
    if adapter is None or adapter.tenant_id != tenant_id:
        raise NotFound(f"no adapter {adapter_id!r}", param="adapter_id")
    existing = session.scalar(
        select(Merge)
        .where(
            Merge.adapter_id == adapter.id,
            Merge.dtype == dtype,
            Merge.status.in_((*ACTIVE, "succeeded")),
        )
        .order_by(Merge.created_at.desc())
        .limit(1)
    )
    if existing is not None:
        return existing, None
    queue = session.scalar(select(Job.gpu_class).where(Job.id == adapter.job_id)) or CPU_QUEUE
    merge_id = new_id("merge")
    row = Merge(
        id=merge_id,
        tenant_id=tenant_id,
        adapter_id=adapter.id,
        dtype=dtype,
        status="queued",
        queue=queue,
        storage_prefix=merged_prefix(tenant_id, merge_id),
    )
    session.add(row)
    session.flush()
    return row, _enqueue(session, row, caller_sends=True)


def _enqueue(
    session: Session, row: Merge, *, caller_sends: bool = False, delay_s: float = 0.0
) -> OutboxMessage:
    message = OutboxMessage(
        job_id=row.id,
        queue=row.queue,
        available_at=None if caller_sends else utcnow() + timedelta(seconds=delay_s),
    )
    session.add(message)
    session.flush()
    return message


def get_merge(session: Session, *, tenant_id: str, merge_id: str) -> Merge:
    row = session.get(Merge, merge_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no merge {merge_id!r}", param="merge_id")
    return row


def list_merges(session: Session, *, tenant_id: str, adapter_id: str) -> list[Merge]:
    """The adapter's merges, newest first (another tenant's adapter: 404)."""
    adapters.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    query = select(Merge).where(Merge.adapter_id == adapter_id)
    return list(session.scalars(query.order_by(Merge.created_at.desc(), Merge.id.desc())))


def archive_key(session: Session, *, tenant_id: str, merge_id: str) -> str:
    """The merged model's archive; 409 `merge_not_ready` until the merge succeeded."""
    row = get_merge(session, tenant_id=tenant_id, merge_id=merge_id)
    if row.status != "succeeded":
        raise Conflict(
            f"the merge is {row.status}; it can be downloaded once it succeeded",
            param="merge_id",
            code="merge_not_ready",
        )
    return row.storage_prefix + ARCHIVE_NAME


def drop_merges(session: Session, rows: list[Merge]) -> int:
    """Delete merge rows with their unsent messages; their objects are scheduled for deletion
    in the same transaction. A worker still merging one finds it gone and writes nothing."""
    for row in rows:
        retention.schedule_deletion(session, row.storage_prefix)
        session.execute(delete(OutboxMessage).where(OutboxMessage.job_id == row.id))
        session.delete(row)
    session.flush()
    return len(rows)


def delete_merge(session: Session, *, tenant_id: str, merge_id: str) -> Merge:
    row = get_merge(session, tenant_id=tenant_id, merge_id=merge_id)
    drop_merges(session, [row])
    return row


def drop_adapter_merges(session: Session, *, adapter_id: str) -> int:
    """`shared.adapters.delete_adapter`'s part: the adapter's merges go with it."""
    return drop_merges(
        session, list(session.scalars(select(Merge).where(Merge.adapter_id == adapter_id)))
    )


# --------------------------------------------------------------------------- worker verbs


@dataclass(frozen=True)
class MergeClaim:
    """What a worker needs to run a merge; `attempt` fences its writes."""

    merge_id: str
    tenant_id: str
    attempt: int
    dtype: str
    storage_prefix: str
    adapter_prefix: str
    model_source: str | None
    model_revision: str | None
    training_key: str | None
    validation_key: str | None


def claim(session: Session, *, merge_id: str, stale_after: timedelta) -> MergeClaim | None:
    """Take a queued merge (or a running one whose worker stopped heartbeating). None: another
    worker has it, it finished, or it was deleted; the message is then dropped."""
    now = utcnow()
    result = session.execute(
        update(Merge)
        .where(
            Merge.id == merge_id,
            or_(
                Merge.status == "queued",
                (Merge.status == "running") & (Merge.updated_at < now - stale_after),
            ),
        )
        .values(status="running", attempts=Merge.attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    row = session.get(Merge, merge_id, populate_existing=True)
    assert row is not None
    adapter = session.get(Adapter, row.adapter_id)
    assert adapter is not None  # the foreign key cascades
    job = session.get(Job, adapter.job_id)
    model = session.scalar(
        select(RegisteredModel).where(RegisteredModel.name == adapter.base_model)
    )

    def key(file_id: str | None) -> str | None:
        found = session.get(File, file_id) if file_id else None
        return found.storage_key if found is not None and found.tenant_id == row.tenant_id else None

    return MergeClaim(
        merge_id=row.id,
        tenant_id=row.tenant_id,
        attempt=row.attempts,
        dtype=row.dtype,
        storage_prefix=row.storage_prefix,
        adapter_prefix=adapter.storage_prefix,
        model_source=model.source if model is not None else None,
        model_revision=model.revision if model is not None else None,
        training_key=key(job.training_file) if job is not None else None,
        validation_key=key(job.validation_file) if job is not None else None,
    )


def _held(claim_: MergeClaim) -> Any:
    return (
        (Merge.id == claim_.merge_id)
        & (Merge.status == "running")
        & (Merge.attempts == claim_.attempt)
    )


def heartbeat(session: Session, claim_: MergeClaim) -> bool:
    """Still ours? Then say so (the sweeper re-sends merges whose heartbeat went stale)."""
    result = session.execute(
        update(Merge)
        .where(_held(claim_))
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _finish(session: Session, claim_: MergeClaim, **values: Any) -> bool:
    now = utcnow()
    result = session.execute(
        update(Merge)
        .where(_held(claim_))
        .values(updated_at=now, finished_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def succeed(session: Session, claim_: MergeClaim, *, parity: dict[str, Any]) -> bool:
    return _finish(session, claim_, status="succeeded", parity=parity)


def fail(session: Session, claim_: MergeClaim, *, code: str, detail: str = "") -> bool:
    message = public_message(code, detail)
    return _finish(session, claim_, status="failed", error_code=code, error_message=message)


def requeue(session: Session, claim_: MergeClaim, *, delay_s: float) -> bool:
    """A transient fault outlived the retry budget: queue it again later, or fail it once it
    has had `MAX_ATTEMPTS` claims."""
    if claim_.attempt >= MAX_ATTEMPTS:
        return fail(session, claim_, code="transient_retries_exhausted")
    result = session.execute(
        update(Merge)
        .where(_held(claim_))
        .values(status="queued", updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    row = session.get(Merge, claim_.merge_id)
    assert row is not None
    _enqueue(session, row, delay_s=delay_s)
    return True


def exists(session: Session, merge_id: str) -> bool:
    return session.get(Merge, merge_id) is not None


def recover_stale(session: Session, *, stale_after: timedelta) -> dict[str, list[str]]:
    """The sweeper's part: a running merge whose worker stopped heartbeating is re-sent (its
    next claim takes it over), or failed once it has had `MAX_ATTEMPTS` claims; a queued merge
    whose message is long gone is re-sent (the claim drops duplicates)."""
    now = utcnow()
    report: dict[str, list[str]] = {"resent": [], "failed": []}
    stale = session.scalars(
        select(Merge).where(Merge.status == "running", Merge.updated_at < now - stale_after)
    ).all()
    for row in stale:
        if row.attempts >= MAX_ATTEMPTS:
            row.status, row.error_code = "failed", "merge_worker_lost"
            row.error_message = public_message("merge_worker_lost")
            row.finished_at = now
            report["failed"].append(row.id)
        else:  # queued again: the dead worker's claim no longer holds, the next one takes it
            row.status, row.updated_at = "queued", now
            _enqueue(session, row)
            report["resent"].append(row.id)
    pending = (
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.job_id == Merge.id, OutboxMessage.sent_at.is_(None))
        .scalar_subquery()
    )
    lost = session.scalars(
        select(Merge).where(
            Merge.status == "queued",
            Merge.updated_at < now - REPUBLISH_QUEUED_AFTER,
            pending == 0,
        )
    ).all()
    for row in lost:
        row.updated_at = now
        _enqueue(session, row)
        report["resent"].append(row.id)
    session.flush()
    return report
