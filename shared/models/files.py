from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, utcnow


class File(Base):
    """A validated JSONL dataset. A row exists only once its object is fully stored."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int]
    format: Mapped[str] = mapped_column(String(32))
    rows: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]]
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class RegisteredModel(Base):
    """A base model an admin allowed tenants to tune (table `base_models`)."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(1000))
    revision: Mapped[str | None] = mapped_column(String(100), default=None)
    config: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
