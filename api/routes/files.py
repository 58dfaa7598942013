"""`/v1/files`: OpenAI-shaped dataset files. Uploads stream through `api.upload`."""

from __future__ import annotations

import itertools
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.metrics import UPLOAD_BYTES
from api.upload import UploadLimits, discard, receive_upload
from shared.errors import BadRequest, NotFound
from shared.files import service
from shared.files.schemas import FileDeleted, FileList, FileObject
from shared.ids import new_id
from shared.jobs import retention
from shared.storage import ObjectNotFound, ObjectStore, StorageError, file_key

router = APIRouter(prefix="/v1/files", tags=["files"])
log = logging.getLogger("api.files")


@router.post("", response_model=FileObject)
async def upload_file(
    request: Request, tenant: CurrentTenant, settings: SettingsDep, store: StoreDep
) -> FileObject:
    file_id = new_id("file")
    key = file_key(tenant.id, file_id)
    upload = await receive_upload(
        request,
        limits=UploadLimits(
            max_bytes=settings.max_upload_bytes,
            max_line_bytes=settings.max_line_bytes,
            max_fields=settings.max_multipart_fields,
            max_field_bytes=settings.max_multipart_field_bytes,
            max_filename_chars=settings.max_filename_chars,
        ),
        open_writer=lambda: store.open_writer(key),
    )
    UPLOAD_BYTES.inc(upload.validator.bytes_seen)
    validator = upload.validator
    if not validator.ok:
        first = validator.errors[0]
        where = f"line {first.line}: " if first.line else ""
        raise BadRequest(
            f"invalid JSONL ({validator.error_count} problem(s)); {where}{first.reason}",
            param="file",
            code="invalid_file",
            extra={"lines": [{"line": e.line, "reason": e.reason} for e in validator.errors]},
        )
    try:
        purpose = service.check_purpose(upload.fields.get("purpose"))
        assert upload.filename is not None

        def record() -> FileObject:
            with request.app.state.sessions.begin() as session:
                row = service.create_file(
                    session,
                    file_id=file_id,
                    tenant_id=tenant.id,
                    filename=upload.filename or "",
                    purpose=purpose,
                    storage_key=key,
                    validator=validator,
                )
                return FileObject.of(row)

        return await run_in_threadpool(record)
    except BaseException:
        await discard(upload)
        await run_in_threadpool(_delete_quietly, store, key)
        raise


def _delete_quietly(store: ObjectStore, key: str) -> None:
    """Best effort: the record is what makes a file exist; an orphan object is only space."""
    try:
        store.delete(key)
    except StorageError as exc:
        log.warning("could not delete object %s (%s)", key, type(exc).__name__)


@router.get("", response_model=FileList)
def list_files(
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    purpose: str | None = None,
) -> FileList:
    rows, has_more = service.list_files(
        session, tenant_id=tenant.id, after=after, limit=limit, purpose=purpose
    )
    data = [FileObject.of(r) for r in rows]
    return FileList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, tenant: CurrentTenant, session: SessionDep) -> FileObject:
    return FileObject.of(service.get_file(session, tenant_id=tenant.id, file_id=file_id))


@router.get("/{file_id}/content")
def get_file_content(
    file_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> StreamingResponse:
    row = service.get_file(session, tenant_id=tenant.id, file_id=file_id)
    # Read the first chunk before answering: a store fault is then a 503, not a cut-off 200.
    chunks = store.iter_chunks(row.storage_key)
    try:
        first = next(chunks, b"")
    except ObjectNotFound:
        log.error("file %s has a record but no object %s", row.id, row.storage_key)
        raise NotFound(f"the content of file {file_id!r} is gone", param="file_id") from None
    return StreamingResponse(
        itertools.chain([first], chunks),
        media_type="application/jsonl",
        headers={"content-length": str(row.bytes)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(
    request: Request, file_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> FileDeleted:
    row = service.delete_file(session, tenant_id=tenant.id, file_id=file_id)
    session.commit()
    # Committed: never a 5xx from here on. What the store refuses now stays scheduled in
    # `object_deletions` and the sweeper deletes it later.
    try:
        retention.drain_deletions(request.app.state.sessions, store, limit=20)
    except Exception as exc:
        log.warning("file %s: object deletion deferred (%s)", row.id, type(exc).__name__)
    return FileDeleted(id=row.id)
