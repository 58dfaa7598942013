"""Per-tenant adapters: the PEFT folders that succeeded jobs leave behind."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Adapter, Checkpoint
from shared.pagination import newest_first

ARCHIVE_NAME = "adapter.tar.gz"


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    row = session.get(Adapter, adapter_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no adapter {adapter_id!r}", param="adapter_id")
    return row


def list_adapters(
    session: Session, *, tenant_id: str, after: str | None, limit: int
) -> tuple[list[Adapter], bool]:
    anchor = (
        get_adapter(session, tenant_id=tenant_id, adapter_id=after) if after is not None else None
    )
    query = select(Adapter).where(Adapter.tenant_id == tenant_id)
    return newest_first(session, query, Adapter, anchor=anchor, limit=limit)


def get_adapter_by_name(session: Session, *, tenant_id: str, name: str) -> Adapter:
    """A tenant's fine-tuned model by its `ft:` name; another tenant's is not found (404)."""
    row = session.scalar(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    )
    if row is None:
        raise NotFound(f"no model named {name!r}", param="model", code="model_not_found")
    return row


def delete_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    """Drop the adapter and its job's checkpoints; their objects are scheduled for deletion in
    the same transaction (`shared.jobs.retention`), so nothing is left behind in the store."""
    from shared.jobs import retention
    from shared.jobs.runs import job_checkpoints_root

    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    checkpoints = session.scalars(select(Checkpoint).where(Checkpoint.job_id == row.job_id))
    retention.drop_checkpoints(session, list(checkpoints))
    # Anything else under the job's checkpoint root (an upload a stale worker never recorded).
    retention.schedule_deletion(session, job_checkpoints_root(row.tenant_id, row.job_id))
    retention.schedule_deletion(session, row.storage_prefix)
    from shared.merges import drop_adapter_merges  # merges import this module

    drop_adapter_merges(session, adapter_id=row.id)  # their objects are scheduled too
    session.delete(row)
    session.flush()
    return row
