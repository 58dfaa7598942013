"""Streaming `multipart/form-data` reader for dataset uploads.

Starlette's form parser spools the whole file before the handler runs; this reader instead
feeds the file part, as it arrives, to the JSONL validator and to the object store writer,
so memory stays flat, the size limit trips as soon as it is crossed, and an invalid file is
aborted in the store (nothing is left behind).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from shared.errors import BadRequest, TooLarge
from shared.files.service import check_filename
from shared.files.validation import JsonlValidator
from shared.storage import ObjectWriter

FLUSH_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # headers and small fields around the file part


@dataclass
class Upload:
    validator: JsonlValidator
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    writer: ObjectWriter | None = None
    committed: bool = False


class _PartState:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.name: str | None = None
        self.is_file = False
        self.value = bytearray()


async def receive_upload(
    request: Request,
    *,
    max_bytes: int,
    max_line_bytes: int,
    open_writer: Callable[[], ObjectWriter],
) -> Upload:
    """Read the request body; on success the object is committed and `Upload` describes it.

    Raises `BadRequest`/`TooLarge` with nothing stored. The caller must still `discard` the
    upload if it fails afterwards (for example when `purpose` turns out to be wrong).
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadRequest("the body must be multipart/form-data with a 'file' part", param="file")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD_BYTES:
        raise TooLarge(f"the file is larger than the limit of {max_bytes} bytes", param="file")

    upload = Upload(validator=JsonlValidator(max_line_bytes=max_line_bytes))
    pending = bytearray()
    file_bytes = 0
    part = _PartState()
    seen_file = False

    def on_part_begin() -> None:
        nonlocal part
        part = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.header_field.decode("latin-1").lower()] = part.header_value.decode(
            "utf-8", "replace"
        )
        part.header_field.clear()
        part.header_value.clear()

    def on_headers_finished() -> None:
        nonlocal seen_file
        _, opts = parse_options_header(part.headers.get("content-disposition", ""))
        part.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if part.name == "file":
            if seen_file:
                raise BadRequest("only one 'file' part is allowed", param="file")
            seen_file = True
            part.is_file = True
            raw = opts.get(b"filename")
            upload.filename = check_filename(raw.decode("utf-8", "replace") if raw else None)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal file_bytes
        chunk = data[start:end]
        if part.is_file:
            file_bytes += len(chunk)
            if file_bytes > max_bytes:
                raise TooLarge(
                    f"the file is larger than the limit of {max_bytes} bytes", param="file"
                )
            pending.extend(chunk)
        else:
            part.value += chunk
            if len(part.value) > MAX_FIELD_BYTES:
                raise BadRequest(f"form field {part.name!r} is too long", param=part.name)

    def on_part_end() -> None:
        if not part.is_file and part.name:
            upload.fields[part.name] = part.value.decode("utf-8", "replace")

    def consume(data: bytes) -> None:
        upload.validator.feed(data)
        if not upload.validator.ok:
            if upload.writer is not None:
                upload.writer.abort()
                upload.writer = None
            return
        if upload.writer is None and upload.validator.bytes_seen == len(data):
            upload.writer = open_writer()
        if upload.writer is not None:
            upload.writer.write(data)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if len(pending) >= FLUSH_BYTES:
                data = bytes(pending)
                pending.clear()
                await run_in_threadpool(consume, data)
        parser.finalize()
        if not seen_file:
            raise BadRequest("the request has no 'file' part", param="file")
        if pending:
            await run_in_threadpool(consume, bytes(pending))
        upload.validator.finish()
        if not upload.validator.ok:
            await discard(upload)
            return upload
        assert upload.writer is not None  # a file with rows opened one on its first chunk
        await run_in_threadpool(upload.writer.commit)
        upload.committed = True
        return upload
    except ClientDisconnect:
        await discard(upload)
        raise BadRequest("the client disconnected during the upload", param="file") from None
    except Exception:
        await discard(upload)
        raise


async def discard(upload: Upload) -> None:
    if upload.writer is not None and not upload.committed:
        await run_in_threadpool(upload.writer.abort)
        upload.writer = None
