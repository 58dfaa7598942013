"""Object store: one interface, an S3 backend (AWS, MinIO, R2, moto) and a local folder.

Keys are built from ids only (`files/{tenant}/{file}.jsonl`), never from user input, and are
checked against `KEY_PATTERN` on every call so that no path can leave its tenant prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlencode, urlparse

import boto3
from botocore.config import Config

from shared.config import Settings

KEY_PATTERN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")
MAX_PRESIGN_SECONDS = 900
PART_SIZE = 8 * 1024 * 1024  # S3 multipart part size (min 5 MiB except the last part)
CHUNK_SIZE = 1024 * 1024


class StorageError(RuntimeError):
    """The store refused an operation (bad key, bad expiry, unreachable backend)."""


class ObjectNotFound(StorageError):
    """No object under that key."""


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


def checkpoint_prefix(tenant_id: str, job_id: str, step: int) -> str:
    return check_prefix(f"checkpoints/{tenant_id}/{job_id}/step-{int(step)}")


def adapter_prefix(tenant_id: str, adapter_id: str) -> str:
    return check_prefix(f"adapters/{tenant_id}/{adapter_id}")


class ObjectWriter(ABC):
    """A streaming upload: `write` chunks, then `commit` (object appears) or `abort` (nothing)."""

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
    def list_keys(self, prefix: str) -> list[str]: ...

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
        writer.commit()
        return total

    def put_bytes(self, key: str, data: bytes) -> None:
        writer = self.open_writer(key)
        writer.write(data)
        writer.commit()

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
    def __init__(self, target: Path) -> None:
        self._target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-", suffix=".part")
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._tmp.replace(self._target)

    def abort(self) -> None:
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
        return _FolderWriter(self._path(key))

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / check_prefix(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".upload-")
        )

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
        probe.write_bytes(b"")
        probe.unlink()

    def delete_prefix(self, prefix: str) -> int:
        count = super().delete_prefix(prefix)
        shutil.rmtree(self.root / check_prefix(prefix), ignore_errors=True)
        return count


# --------------------------------------------------------------------------- S3


class _S3Writer(ObjectWriter):
    """Buffers up to one part, then switches to a multipart upload; small objects use one PUT."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
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
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
            return
        if self._buffer:
            self._flush_part(bytes(self._buffer))
            self._buffer.clear()
        self._client.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is not None:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            )
            self._upload_id = None


class S3Store(ObjectStore):
    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.bucket = bucket
        # MinIO, R2 and older S3-compatible stores reject the CRC checksums that recent boto3
        # sends by default; only compute them when the operation requires one.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            config=config,
        )

    def open_writer(self, key: str) -> ObjectWriter:
        return _S3Writer(self.client, self.bucket, check_key(key))

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise ObjectNotFound(key) from exc
        body = resp["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
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

    def list_keys(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=check_prefix(prefix)):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(keys)

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
        )
    raise StorageError(f"unsupported STORAGE_URL scheme {parsed.scheme!r}")
