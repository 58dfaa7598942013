"""Object store: one interface, an S3 backend (AWS, MinIO, R2, moto) and a local folder.

Keys are built from ids only (`files/{tenant}/{file}.jsonl`), never from user input, and are
checked against `KEY_PATTERN` on every call so that no path can leave its tenant prefix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import quote, unquote, urlencode, urlparse

import boto3
from botocore.config import Config

from shared.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")
MAX_PRESIGN_SECONDS = 900
PART_SIZE = 8 * 1024 * 1024  # S3 multipart part size (min 5 MiB except the last part)
CHUNK_SIZE = 1024 * 1024


class StorageError(RuntimeError):
    """The store refused an operation (bad key, bad expiry, unreachable backend)."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class StoreUnavailable(StorageError):
    """A transient store fault that outlasted the client's own retries: a connection refused,
    reset or timed out, a 5xx / SlowDown, or an upload whose stored size does not match what
    was sent. Callers retry it with backoff (`shared.jobs.faults`)."""


TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}
)


def is_transient_s3_error(exc: BaseException) -> bool:
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(
        exc,
        BotoConnectionError
        | ReadTimeoutError
        | HTTPClientError
        | ResponseStreamingError
        | IncompleteReadError  # a body that ended before its Content-Length
        | ConnectionError
        | TimeoutError,
    ):
        return True
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or error.get("Code") in TRANSIENT_S3_CODES
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        return False
    return isinstance(exc, Urllib3Error)


# OSErrors of a folder store that say "the disk or its mount is in trouble right now", not
# "this request is wrong": a network mount timing out or gone stale, an I/O error, a full disk.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENOLCK,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
    }
)


@contextlib.contextmanager
def folder_faults(what: str) -> Iterator[None]:
    """Turn a folder store's transient OSError into `StoreUnavailable`; others pass through."""
    try:
        yield
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            raise StoreUnavailable(f"{what}: {name}") from exc
        raise


def check_key(key: str) -> str:
    """Refuse anything that is not a plain relative key made of safe characters."""
    if (
        not key
        or key.startswith("/")
        or key.endswith("/")
        or any(c not in KEY_PATTERN_CHARS for c in key)
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise StorageError(f"illegal object key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    check_key(prefix.rstrip("/"))
    return prefix.rstrip("/") + "/"


def file_key(tenant_id: str, file_id: str) -> str:
    return check_key(f"files/{tenant_id}/{file_id}.jsonl")


def results_key(tenant_id: str, file_id: str) -> str:
    """A job's results CSV: a File of the tenant's like an upload, under the same prefix."""
    return check_key(f"files/{tenant_id}/{file_id}.csv")


def checkpoint_prefix(tenant_id: str, job_id: str, step: int) -> str:
    return check_prefix(f"checkpoints/{tenant_id}/{job_id}/step-{int(step)}")


def adapter_prefix(tenant_id: str, adapter_id: str) -> str:
    return check_prefix(f"adapters/{tenant_id}/{adapter_id}")


class ObjectWriter(ABC):
    """A streaming upload: `write` chunks, then `commit` or `abort` (nothing appears).

    `commit` returns only once the object is stored and verified (its stored size is what was
    written); when it raises, it has aborted the upload itself, so a caller never holds a
    half-finished upload. A verification mismatch raises `StoreUnavailable`: upload again.
    """

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...


class ObjectStore(ABC):
    @abstractmethod
    def open_writer(self, key: str) -> ObjectWriter: ...

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every complete object under `prefix` with its size in bytes."""

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self.list_sizes(prefix))

    @abstractmethod
    def presigned_get(self, key: str, expires: int = MAX_PRESIGN_SECONDS) -> str: ...

    @abstractmethod
    def check(self) -> None:
        """Raise if the store is unreachable (readiness probe)."""

    # Conveniences built on the primitives above.
    def put_stream(self, key: str, stream: BinaryIO) -> int:
        writer = self.open_writer(key)
        total = 0
        try:
            while chunk := stream.read(CHUNK_SIZE):
                writer.write(chunk)
                total += len(chunk)
        except BaseException:
            writer.abort()
            raise
        writer.commit()  # verified; aborts itself when it fails
        return total

    def put_bytes(self, key: str, data: bytes) -> None:
        writer = self.open_writer(key)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        writer.commit()  # verified; aborts itself when it fails

    def verify_size(self, key: str, expected: int) -> None:
        """After an upload completed: the store holds exactly what was sent (a HEAD).

        A mismatch is left in place (a retry overwrites it; the key is recorded nowhere until
        an upload verifies) rather than deleted, which could race a concurrent writer."""
        try:
            stored = self.size(key)
        except ObjectNotFound:
            stored = -1
        if stored != expected:
            raise StoreUnavailable(f"upload of {key} not verified: {stored} of {expected} bytes")

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        """Remove unfinished uploads (S3 multipart, the folder's temporary files) that a killed
        process left behind; returns how many."""
        return 0

    def put_file(self, key: str, path: Path) -> int:
        with path.open("rb") as fh:
            return self.put_stream(key, fh)

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_chunks(key))

    def download_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with tmp.open("wb") as fh:
            for chunk in self.iter_chunks(key):
                fh.write(chunk)
        tmp.replace(path)

    def sync_dir(
        self,
        prefix: str,
        folder: Path,
        *,
        delete_strays: bool = True,
        on_landed: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Make `prefix` hold `folder`'s files, sending only those it lacks; returns the keys.

        Meant to be retried: every object lands whole and verified or not at all, so after a
        failure part way a retry lists what arrived and sends the rest. Under a flaky store each
        try makes progress instead of starting over. A file whose stored size differs is sent
        again; with `delete_strays`, objects under the prefix that the folder lacks are deleted.
        Sizes are compared, not contents: a prefix is written by one writer (checkpoints are
        attempt-scoped, adapters have fresh ids), so a same-sized object is the same upload.
        `on_landed(key)` is called as each object lands (the retry budget's progress)."""
        prefix = check_prefix(prefix)
        wanted = {
            prefix + path.relative_to(folder).as_posix(): path
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        present = self.list_sizes(prefix)
        if delete_strays:
            for key in sorted(set(present) - set(wanted)):
                self.delete(key)
        todo = [(k, p) for k, p in wanted.items() if present.get(k) != p.stat().st_size]

        def send(key: str, path: Path) -> None:
            self.put_file(key, path)
            if on_landed is not None:
                on_landed(key)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda item: send(*item), todo))
        return list(wanted)

    def upload_dir(self, prefix: str, folder: Path) -> list[str]:
        """Upload every file under `folder` below `prefix` (a few at a time); returns the keys."""
        prefix = check_prefix(prefix)
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        keys = [prefix + path.relative_to(folder).as_posix() for path in paths]
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(self.put_file, keys, paths))
        return keys

    def download_prefix(self, prefix: str, folder: Path) -> list[Path]:
        prefix = check_prefix(prefix)
        paths = []
        for key in self.list_keys(prefix):
            target = folder / key[len(prefix) :]
            self.download_file(key, target)
            paths.append(target)
        return paths

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(check_prefix(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)


# --------------------------------------------------------------------------- local folder


def sign_key(secret: str, key: str, expires_at: int) -> str:
    msg = f"{key}\n{expires_at}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def verify_signature(secret: str, key: str, expires_at: int, signature: str) -> bool:
    if expires_at < int(time.time()):
        return False
    return hmac.compare_digest(sign_key(secret, key, expires_at), signature)


class _FolderWriter(ObjectWriter):
    def __init__(self, key: str, target: Path, verify: Callable[[str, int], None]) -> None:
        self._key = key
        self._target = target
        self._verify = verify
        self._written = 0
        with folder_faults(f"open {key}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-", suffix=".part")
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        with folder_faults(f"write {self._key}"):
            self._fh.write(data)
        self._written += len(data)

    def commit(self) -> None:
        try:
            with folder_faults(f"commit {self._key}"):
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                self._tmp.replace(self._target)
        except BaseException:
            self.abort()
            raise
        self._verify(self._key, self._written)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # best effort: abort_stale_uploads takes leftovers
            if not self._fh.closed:
                self._fh.close()
            self._tmp.unlink(missing_ok=True)


class FolderStore(ObjectStore):
    """Objects as files under a root folder; writes land atomically by rename."""

    def __init__(self, root: Path, *, signing_secret: str, base_url: str = "") -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = signing_secret
        self._base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise StorageError(f"illegal object key {key!r}")
        return path

    def open_writer(self, key: str) -> ObjectWriter:
        return _FolderWriter(key, self._path(key), self.verify_size)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            with folder_faults(f"read {key}"):
                fh = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with fh:
            while True:
                with folder_faults(f"read {key}"):
                    chunk = fh.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def exists(self, key: str) -> bool:
        with folder_faults(f"stat {key}"):
            return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            with folder_faults(f"stat {key}"):
                return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def delete(self, key: str) -> None:
        with folder_faults(f"delete {key}"):
            self._path(key).unlink(missing_ok=True)

    def list_sizes(self, prefix: str) -> dict[str, int]:
        base = self.root / check_prefix(prefix)
        with folder_faults(f"list {prefix}"):
            if not base.is_dir():
                return {}
            return {
                p.relative_to(self.root).as_posix(): p.stat().st_size
                for p in sorted(base.rglob("*"))
                if p.is_file() and not p.name.startswith(".upload-")
            }

    def presigned_get(self, key: str, expires: int = MAX_PRESIGN_SECONDS) -> str:
        if not 0 < expires <= MAX_PRESIGN_SECONDS:
            raise StorageError(f"expires must be in (0, {MAX_PRESIGN_SECONDS}] seconds")
        expires_at = int(time.time()) + expires
        query = urlencode(
            {"expires": expires_at, "signature": sign_key(self._secret, key, expires_at)}
        )
        return f"{self._base_url}/v1/storage/{quote(check_key(key))}?{query}"

    def verify(self, key: str, expires_at: int, signature: str) -> bool:
        return verify_signature(self._secret, unquote(key), expires_at, signature)

    def check(self) -> None:
        probe = self.root / f".ready-{uuid.uuid4().hex}"
        with folder_faults("readiness probe"):
            probe.write_bytes(b"")
            probe.unlink()

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        shutil.rmtree(self.root / check_prefix(prefix), ignore_errors=True)
        return count

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        cutoff = time.time() - older_than.total_seconds()
        removed = 0
        for path in self.root.rglob(".upload-*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


# --------------------------------------------------------------------------- S3


class _S3Writer(ObjectWriter):
    """Buffers up to one part, then switches to a multipart upload; small objects use one PUT."""

    def __init__(
        self, client: _GuardedClient, bucket: str, key: str, verify: Callable[[str, int], None]
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._verify = verify
        self._written = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self._written += len(data)
        self._buffer += data
        while len(self._buffer) >= PART_SIZE:
            with memoryview(self._buffer) as view:
                part = view[:PART_SIZE].tobytes()  # one copy, not slice + bytes()
            del self._buffer[:PART_SIZE]
            self._flush_part(part)

    def _flush_part(self, body: bytes) -> None:
        if self._upload_id is None:
            resp = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)
            self._upload_id = resp["UploadId"]
        number = len(self._parts) + 1
        resp = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    def commit(self) -> None:
        try:
            if self._upload_id is None:
                body = bytes(self._buffer)
                self._client.put_object(Bucket=self._bucket, Key=self._key, Body=body)
            else:
                self._complete()
        except BaseException:
            self.abort()
            raise
        self._verify(self._key, self._written)

    def _complete(self) -> None:
        if self._buffer:
            self._flush_part(bytes(self._buffer))
            self._buffer.clear()
        try:
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        except self._client.exceptions.NoSuchUpload:
            # boto retried a completion whose answer was lost on the way back: the first try
            # completed it. Verification tells a completed object from a vanished upload.
            log.warning("completion of %s retried after it succeeded", self._key)
        self._upload_id = None  # completed: nothing left to abort

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=upload_id
                )
            except Exception as exc:  # best effort, called while another error propagates
                # The store is down: the sweeper's abort_stale_uploads takes it later.
                log.warning("abort of %s left for the sweeper: %s", self._key, type(exc).__name__)


class _GuardedClient:
    """A boto3 S3 client whose calls raise `StoreUnavailable` for transient faults."""

    def __init__(self, client: Any) -> None:
        self.raw = client
        self.exceptions = client.exceptions

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.raw, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return guarded(name, lambda: method(*args, **kwargs))

        return call


def guarded(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except StorageError:
        raise
    except Exception as exc:
        if is_transient_s3_error(exc):
            raise StoreUnavailable(f"{what}: {type(exc).__name__}") from exc
        raise


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
    ) -> None:
        self.bucket = bucket
        # MinIO, R2 and older S3-compatible stores reject the CRC checksums that recent boto3
        # sends by default; only compute them when the operation requires one.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # A stalled store is noticed in seconds, not after the default minute; boto's own
            # retries (resets, 5xx, throttling) come first, then StoreUnavailable.
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # total_max_attempts counts the first try; botocore's max_attempts would not.
            # Legacy mode, not standard: standard keeps a per-client retry quota that a long
            # outage drains (about 50 connection errors), after which the client never retries
            # again until hundreds of calls succeed; a long-lived worker then fails every later
            # blip on its first try. The budget that matters is ours (shared.jobs.faults).
            retries={"total_max_attempts": max_attempts, "mode": "legacy"},
        )
        raw = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            config=config,
        )
        self.client = _GuardedClient(raw)

    def open_writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self.client, self.bucket, check_key(key), self.verify_size)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise ObjectNotFound(key) from exc
        body = resp["Body"]
        chunks = body.iter_chunks(chunk_size)
        try:
            while True:
                chunk = guarded(f"read {key}", lambda: next(chunks, None))
                if chunk is None:
                    return
                yield chunk
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(key) from exc
            raise
        return int(resp["ContentLength"])

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def list_sizes(self, prefix: str) -> dict[str, int]:
        def pages() -> dict[str, int]:
            paginator = self.client.raw.get_paginator("list_objects_v2")
            sizes: dict[str, int] = {}
            for page in paginator.paginate(Bucket=self.bucket, Prefix=check_prefix(prefix)):
                sizes.update((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
            return dict(sorted(sizes.items()))

        return guarded(f"list {prefix}", pages)

    def abort_stale_uploads(self, older_than: timedelta) -> int:
        cutoff = datetime.now(UTC) - older_than

        def stale() -> list[tuple[str, str]]:
            paginator = self.client.raw.get_paginator("list_multipart_uploads")
            found = []
            for page in paginator.paginate(Bucket=self.bucket):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        found.append((upload["Key"], upload["UploadId"]))
            return found

        uploads = guarded("list multipart uploads", stale)
        for key, upload_id in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        return len(uploads)

    def presigned_get(self, key: str, expires: int = MAX_PRESIGN_SECONDS) -> str:
        if not 0 < expires <= MAX_PRESIGN_SECONDS:
            raise StorageError(f"expires must be in (0, {MAX_PRESIGN_SECONDS}] seconds")
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": check_key(key)}, ExpiresIn=expires
        )
        return url

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def make_store(settings: Settings, *, signing_secret: str | None = None) -> ObjectStore:
    parsed = urlparse(settings.storage_url)
    if parsed.scheme == "file":
        secret = signing_secret or settings.signing_secret
        if not secret:
            raise StorageError("the folder store needs SIGNING_SECRET for signed URLs")
        return FolderStore(
            Path(unquote(parsed.path)), signing_secret=secret, base_url=settings.public_base_url
        )
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError("STORAGE_URL must name a bucket: s3://bucket")
        return S3Store(
            parsed.netloc,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            region=settings.s3_region,
            connect_timeout=settings.s3_connect_timeout_seconds,
            read_timeout=settings.s3_read_timeout_seconds,
            max_attempts=settings.s3_max_attempts,
        )
    raise StorageError(f"unsupported STORAGE_URL scheme {parsed.scheme!r}")
