"""Moving files: a dataset upload streamed from disk as `multipart/form-data` (so a progress
bar can follow it and memory stays flat), and an adapter archive unpacked into a folder that
`PeftModel.from_pretrained(base, folder)` loads."""

from __future__ import annotations

import secrets
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK = 256 * 1024


class TransferError(Exception):
    """A local problem: an unreadable file, a folder in the way, a malformed archive."""


@dataclass(frozen=True)
class MultipartUpload:
    content_type: str
    length: int
    body: Iterator[bytes]


def _quoted(value: str) -> str:
    """A header parameter value as browsers write it (RFC 7578: UTF-8, `"` and CR/LF
    percent-encoded)."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def multipart_upload(
    path: Path, *, fields: dict[str, str], on_bytes: Callable[[int], None]
) -> MultipartUpload:
    """The body of `POST /v1/files`: `fields` first, then the file read in chunks, calling
    `on_bytes(n)` as each chunk leaves; its exact length is known up front."""
    try:
        file_size = path.stat().st_size
    except OSError as exc:
        raise TransferError(f"cannot read {path}: {exc.strerror or 'unreadable'}") from None
    if not path.is_file():
        raise TransferError(f"{path} is not a file")
    boundary = "qlora-" + secrets.token_hex(16)
    head = b""
    for name, value in fields.items():
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n'
            f"{value}\r\n"
        ).encode()
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{_quoted(path.name)}"\r\nContent-Type: application/jsonl\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        sent = 0
        with path.open("rb") as fh:
            while sent < file_size:
                chunk = fh.read(min(CHUNK, file_size - sent))
                if not chunk:
                    raise TransferError(f"{path} got shorter while it was being uploaded")
                sent += len(chunk)
                yield chunk
                on_bytes(len(chunk))
        yield tail

    return MultipartUpload(
        content_type=f"multipart/form-data; boundary={boundary}",
        length=len(head) + file_size + len(tail),
        body=body(),
    )


def check_target(out: Path, *, force: bool) -> None:
    """`out` must be a new or empty folder, unless `force` lets its files be overwritten."""
    if out.exists() and not out.is_dir():
        raise TransferError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TransferError(f"{out} is not empty (use --force to overwrite its files)")


def unpack_adapter(archive: Path, out: Path) -> list[Path]:
    """Unpack the service's adapter archive (`adapter/<files>`) into `out` itself, so that
    `out/adapter_config.json` exists. Only regular files at safe relative paths are taken;
    anything else (links, devices, `..`, absolute names) makes the archive malformed."""
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            names = [PurePosixPath(m.name) for m in members]
            tops = {n.parts[0] for n in names if n.parts}
            strip = len(tops) == 1 and all(
                len(n.parts) > 1 or m.isdir() for n, m in zip(names, members, strict=True)
            )
            out.mkdir(parents=True, exist_ok=True)
            for member, name in zip(members, names, strict=True):
                if member.isdir():
                    continue
                if not member.isfile():
                    raise TransferError(f"the archive holds a non-file entry: {member.name!r}")
                parts = name.parts[1:] if strip else name.parts
                if not parts or name.is_absolute() or any(p in ("..", "") for p in parts):
                    raise TransferError(f"the archive holds an unsafe name: {member.name!r}")
                target = out.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, target.open("wb") as fh:
                    shutil.copyfileobj(source, fh, CHUNK)
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TransferError(
            f"the adapter archive could not be unpacked ({type(exc).__name__})"
        ) from None
    if not (out / "adapter_config.json").is_file():
        raise TransferError("the archive holds no adapter_config.json: not a PEFT adapter")
    return written
