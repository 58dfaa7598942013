from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from shared.models import File


class FileObject(BaseModel):
    """OpenAI's File object plus the dataset statistics the service records."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    format: str
    rows: int
    sha256: str
    stats: dict[str, Any]

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at.timestamp()),
            filename=row.filename,
            purpose=row.purpose,
            format=row.format,
            rows=row.rows,
            sha256=row.sha256,
            stats=row.stats,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
