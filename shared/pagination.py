"""Newest-first keyset pagination shared by the files, jobs and adapters lists."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session


class _Paged(Protocol):
    created_at: Any
    id: Any


T = TypeVar("T", bound=_Paged)


def newest_first(
    session: Session, query: Select[Any], model: type[T], *, anchor: T | None, limit: int
) -> tuple[list[T], bool]:
    """Rows of `query` created before `anchor` (ties broken by id), newest first; and whether
    more rows follow the page."""
    if anchor is not None:
        query = query.where(
            (model.created_at < anchor.created_at)
            | ((model.created_at == anchor.created_at) & (model.id < anchor.id))
        )
    ordered = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(ordered))
    return rows[:limit], len(rows) > limit
