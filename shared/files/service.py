"""Dataset files: records of validated JSONL objects in the store. Callers commit."""

from __future__ import annotations

from urllib.parse import unquote

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import BadRequest, NotFound
from shared.files.validation import JsonlValidator
from shared.jobs import retention
from shared.models import File
from shared.pagination import newest_first

PURPOSES = frozenset({"fine-tune"})
MAX_FILENAME_CHARS = 255


def check_filename(filename: str | None, *, max_chars: int = MAX_FILENAME_CHARS) -> str:
    """A display name only (keys come from ids), but a hostile one is refused outright.

    Clients percent-encode awkward bytes in multipart filenames (RFC 7578), so the check runs
    on the decoded name: `evil%00.jsonl` is as hostile as a raw NUL.
    """
    if filename:
        filename = unquote(filename)
    if not filename:
        raise BadRequest("the file part has no filename", param="file", code="invalid_filename")
    if len(filename) > max_chars:
        raise BadRequest(
            f"filename is longer than {max_chars} characters",
            param="file",
            code="filename_too_long",
        )
    if (
        any(ord(c) < 32 or ord(c) == 127 for c in filename)
        or "/" in filename
        or "\\" in filename
        or filename in (".", "..")
    ):
        raise BadRequest(
            "filename must be a plain name without path separators or control characters",
            param="file",
            code="invalid_filename",
        )
    return filename


def check_purpose(purpose: str | None) -> str:
    if purpose not in PURPOSES:
        raise BadRequest(f"purpose must be one of: {', '.join(sorted(PURPOSES))}", param="purpose")
    return purpose


def create_file(
    session: Session,
    *,
    file_id: str,
    tenant_id: str,
    filename: str,
    purpose: str,
    storage_key: str,
    validator: JsonlValidator,
) -> File:
    assert validator.ok and validator.format is not None
    row = File(
        id=file_id,
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        bytes=validator.bytes_seen,
        format=validator.format.value,
        rows=validator.rows,
        sha256=validator.sha256,
        stats=validator.stats(),
        storage_key=storage_key,
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str, param: str = "file_id") -> File:
    row = session.get(File, file_id)
    if row is None or row.tenant_id != tenant_id:
        where = "" if param == "file_id" else f"{param}: "
        raise NotFound(f"{where}no file {file_id!r}", param=param)
    return row


def list_files(
    session: Session, *, tenant_id: str, after: str | None, limit: int, purpose: str | None = None
) -> tuple[list[File], bool]:
    anchor = (
        get_file(session, tenant_id=tenant_id, file_id=after, param="after")
        if after is not None
        else None
    )
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return newest_first(session, query, File, anchor=anchor, limit=limit)


def delete_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    """Drop the record and schedule its object's deletion in the same transaction (deleted
    after the commit, retried by the sweeper while the store refuses)."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    retention.schedule_object_deletion(session, row.storage_key)
    session.delete(row)
    session.flush()
    return row
