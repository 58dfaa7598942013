"""Streaming `multipart/form-data` reader for dataset uploads.

Starlette's form parser spools the whole file before the handler runs; this reader instead
feeds the file part, as it arrives, to the JSONL validator and to the object store writer,
so memory stays flat, the size limit trips as soon as it is crossed, and an invalid file is
aborted in the store (nothing is left behind).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from shared.errors import BadRequest, TooLarge
from shared.files.service import check_filename
from shared.files.validation import JsonlValidator
from shared.storage import ObjectWriter

FLUSH_BYTES = 1024 * 1024
# python-multipart's default cap on one part's headers; raised when a longer filename is allowed
# (a percent-encoded character takes up to 12 bytes).
PART_HEADER_BYTES = 4096 + 128
PART_HEADER_COUNT = 8


@dataclass(frozen=True)
class UploadLimits:
    """Every bound of one upload request (see docs/limits.md)."""

    max_bytes: int  # the file part
    max_line_bytes: int
    max_fields: int  # parts, the file included
    max_field_bytes: int  # one non-file part
    max_filename_chars: int

    @property
    def header_bytes(self) -> int:
        return max(PART_HEADER_BYTES, 12 * self.max_filename_chars + 1024)

    @property
    def body_bytes(self) -> int:
        """The most a well-formed request can be: the file, every other part at its limit,
        each part's headers and boundaries."""
        per_part = self.header_bytes * PART_HEADER_COUNT + 512
        return self.max_bytes + self.max_fields * (self.max_field_bytes + per_part)


_OFFSET = re.compile(r"\s*(\(\d+\)|at (index )?\d+)")


def _malformed(reason: str) -> BadRequest:
    return BadRequest(f"malformed multipart body: {reason}", param="file", code="invalid_multipart")


@dataclass
class Upload:
    validator: JsonlValidator
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    writer: ObjectWriter | None = None
    committed: bool = False


class _PartState:
    def __init__(self) -> None:
        self.headers: dict[str, bytes] = {}  # raw: RFC 7578 filenames are UTF-8 bytes
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.name: str | None = None
        self.is_file = False
        self.value = bytearray()


async def receive_upload(
    request: Request, *, limits: UploadLimits, open_writer: Callable[[], ObjectWriter]
) -> Upload:
    """Read the request body; on success the object is committed and `Upload` describes it.

    Raises `BadRequest`/`TooLarge` with nothing stored: a malformed body, one that ends before
    its closing boundary, too many parts, an oversized part or filename. The caller must still
    `discard` the upload if it fails afterwards (for example when `purpose` turns out wrong).
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadRequest(
            "the body must be multipart/form-data with a 'file' part",
            param="file",
            code="invalid_multipart",
        )
    max_bytes = limits.max_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.body_bytes:
        raise TooLarge(f"the file is larger than the limit of {max_bytes} bytes", param="file")

    upload = Upload(validator=JsonlValidator(max_line_bytes=limits.max_line_bytes))
    pending = bytearray()
    file_bytes = 0
    body_bytes = 0
    parts = 0
    ended = False
    part = _PartState()
    seen_file = False

    def on_part_begin() -> None:
        nonlocal part, parts
        parts += 1
        if parts > limits.max_fields:
            raise BadRequest(
                f"the form has more than {limits.max_fields} parts", code="too_many_parts"
            )
        part = _PartState()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.header_field.decode("latin-1").lower()] = bytes(part.header_value)
        part.header_field.clear()
        part.header_value.clear()

    def on_headers_finished() -> None:
        nonlocal seen_file
        _, opts = parse_options_header(part.headers.get("content-disposition", b""))
        part.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if part.name == "file":
            if seen_file:
                raise BadRequest("only one 'file' part is allowed", param="file")
            seen_file = True
            part.is_file = True
            raw = opts.get(b"filename")
            upload.filename = check_filename(
                raw.decode("utf-8", "replace") if raw else None,
                max_chars=limits.max_filename_chars,
            )

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
            if len(part.value) > limits.max_field_bytes:
                raise TooLarge(
                    f"form field {part.name!r} is larger than the limit of "
                    f"{limits.max_field_bytes} bytes",
                    param=part.name or None,
                    code="field_too_large",
                )

    def on_part_end() -> None:
        if not part.is_file and part.name:
            upload.fields[part.name] = part.value.decode("utf-8", "replace")

    def on_end() -> None:
        nonlocal ended
        ended = True

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

    try:
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
                "on_end": on_end,
            },
            max_header_count=PART_HEADER_COUNT,
            max_header_size=limits.header_bytes,
        )
        async for chunk in request.stream():
            body_bytes += len(chunk)
            if body_bytes > limits.body_bytes:  # the epilogue, or a body with no boundary
                raise TooLarge(
                    f"the request is larger than the limit of {limits.body_bytes} bytes",
                    code="request_too_large",
                )
            parser.write(chunk)
            if len(pending) >= FLUSH_BYTES:
                data = bytes(pending)
                pending.clear()
                await run_in_threadpool(consume, data)
        parser.finalize()
        if not ended:
            raise _malformed("the body ends before its closing boundary")
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
    except FormParserError as exc:
        await discard(upload)
        # python-multipart's messages name the rule broken and a byte offset
        raise _malformed(_OFFSET.sub("", str(exc)).lower()) from None
    except BaseException:
        await discard(upload)
        raise


async def discard(upload: Upload) -> None:
    if upload.writer is not None and not upload.committed:
        await run_in_threadpool(upload.writer.abort)
        upload.writer = None
