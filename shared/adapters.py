"""Per-tenant adapters: the PEFT folders that succeeded jobs leave behind."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Adapter
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


def delete_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    session.delete(row)
    session.flush()
    return row
