"""The same contract for both object stores: the folder and S3 over HTTP (moto's server)."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.prestart import migrate
from shared.storage import (
    FolderStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    check_key,
)
from tests.conftest import SIGNING_SECRET, MotoS3, embedded_settings

BIG = 65 * 1024 * 1024 + 12345  # over 64 MiB, and not a multiple of the part size


class Pattern(io.RawIOBase):
    """`size` deterministic bytes produced on the fly, never held whole in memory."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        n = min(len(buffer), self.remaining)
        chunk = (b"0123456789abcdef" * (n // 16 + 1))[:n]
        buffer[:n] = chunk
        self.sha.update(chunk)
        self.remaining -= n
        return n


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "folder":
        yield FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET, base_url="")
    else:
        s3: MotoS3 = request.getfixturevalue("moto_s3")
        yield S3Store(
            s3.new_bucket(),
            endpoint_url=s3.endpoint_url,
            access_key_id="testing",
            secret_access_key="testing",
        )


def test_round_trip_list_and_delete(store: ObjectStore) -> None:
    store.put_bytes("files/org-a/file-1.jsonl", b"hello\n")
    store.put_bytes("files/org-a/file-2.jsonl", b"world\n")
    store.put_bytes("files/org-b/file-3.jsonl", b"other\n")
    assert store.get_bytes("files/org-a/file-1.jsonl") == b"hello\n"
    assert store.size("files/org-a/file-2.jsonl") == 6
    assert store.list_keys("files/org-a") == [
        "files/org-a/file-1.jsonl",
        "files/org-a/file-2.jsonl",
    ]
    store.delete("files/org-a/file-1.jsonl")
    assert not store.exists("files/org-a/file-1.jsonl")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("files/org-a/file-1.jsonl")
    assert store.delete_prefix("files/org-a") == 1
    assert store.list_keys("files/org-a") == [] and store.exists("files/org-b/file-3.jsonl")


def test_aborted_writer_leaves_nothing(store: ObjectStore) -> None:
    writer = store.open_writer("files/org-a/file-x.jsonl")
    writer.write(b"a" * (9 * 1024 * 1024))  # enough to start an S3 multipart upload
    writer.abort()
    assert not store.exists("files/org-a/file-x.jsonl")
    assert store.list_keys("files/org-a") == []
    if isinstance(store, S3Store):
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    else:
        assert list((store.root / "files").rglob("*.part")) == []


@pytest.mark.slow
def test_streams_an_object_larger_than_64_mib(store: ObjectStore, tmp_path: Path) -> None:
    source = Pattern(BIG)
    assert store.put_stream("files/org-a/big.jsonl", source) == BIG  # type: ignore[arg-type]
    assert store.size("files/org-a/big.jsonl") == BIG
    sha = hashlib.sha256()
    largest = 0
    for chunk in store.iter_chunks("files/org-a/big.jsonl"):
        sha.update(chunk)
        largest = max(largest, len(chunk))
    assert sha.hexdigest() == source.sha.hexdigest()
    assert largest <= 1024 * 1024  # streamed in chunks, not read whole
    target = tmp_path / "copy.jsonl"
    store.download_file("files/org-a/big.jsonl", target)
    assert target.stat().st_size == BIG


def test_sync_dir_sends_only_what_the_prefix_lacks(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    for name, size in (("a.bin", 10), ("b.bin", 20), ("sub/c.json", 5)):
        (folder / name).write_bytes(b"x" * size)
    prefix = "checkpoints/org-a/job-1/attempt-1/step-3"
    assert store.sync_dir(prefix, folder) == [
        f"{prefix}/{n}" for n in ("a.bin", "b.bin", "sub/c.json")
    ]
    # As a failed try leaves it: one object missing, one of another size, one stray.
    store.delete(f"{prefix}/a.bin")
    store.put_bytes(f"{prefix}/b.bin", b"short")
    store.put_bytes(f"{prefix}/stray", b"old")
    sent: list[str] = []
    put_file = store.put_file
    monkeypatch.setattr(
        store, "put_file", lambda key, path: sent.append(key) or put_file(key, path)
    )
    landed: list[str] = []
    store.sync_dir(prefix, folder, on_landed=landed.append)
    assert sorted(sent) == sorted(landed) == [f"{prefix}/a.bin", f"{prefix}/b.bin"]
    assert store.list_sizes(prefix) == {
        f"{prefix}/a.bin": 10,
        f"{prefix}/b.bin": 20,
        f"{prefix}/sub/c.json": 5,
    }
    sent.clear()
    store.put_bytes(f"{prefix}/stray", b"old")
    store.sync_dir(prefix, folder, delete_strays=False)
    assert sent == [] and store.exists(f"{prefix}/stray")


def test_keys_cannot_escape(store: ObjectStore) -> None:
    for bad in [
        "../etc/passwd",
        "files/../../x",
        "/abs/key",
        "files//x",
        "files/a b",
        "files/x\x00",
        "files/./x",
        "",
    ]:
        with pytest.raises(StorageError):
            store.put_bytes(bad, b"x")
    assert check_key("adapters/org-a/ftadapter-1/adapter_config.json")


def test_presigned_url_works_then_expires(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("adapters/org-a/ad-1/adapter_config.json", b"{}")
    with pytest.raises(StorageError):
        store.presigned_get("adapters/org-a/ad-1/adapter_config.json", expires=901)
    if isinstance(store, FolderStore):
        # The folder store's URL is served by the API, which checks the HMAC and the expiry.
        settings = embedded_settings(tmp_path / "var", storage_url=f"file://{store.root}")
        migrate(settings)
        client = TestClient(create_app(settings))
        url = store.presigned_get("adapters/org-a/ad-1/adapter_config.json", expires=2)
        assert client.get(url).content == b"{}"
        assert client.get(url.replace("ad-1", "ad-2")).status_code == 404  # signature is per key
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
        assert client.get(tampered).status_code == 404
        time.sleep(3)
        resp = client.get(url)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "link_expired"
    else:
        url = store.presigned_get("adapters/org-a/ad-1/adapter_config.json", expires=2)
        assert httpx.get(url).content == b"{}"
        # moto serves expired links (it does not check X-Amz-Expires), so check what S3 and
        # MinIO enforce: the signed expiry window, counted from a signing time of now.
        query = parse_qs(urlparse(url).query)
        assert query["X-Amz-Expires"] == ["2"] and query["X-Amz-SignedHeaders"] == ["host"]
        signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
        assert "/adapters/org-a/ad-1/adapter_config.json" in urlparse(url).path


def test_s3_uploads_send_no_default_crc_checksums(moto_s3: MotoS3) -> None:
    """MinIO and other S3-compatible stores reject boto3's default CRC32 trailers."""
    store = S3Store(
        moto_s3.new_bucket(),
        endpoint_url=moto_s3.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
    )
    sent: list[dict[str, str]] = []
    store.client.raw.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers))
    )
    store.put_bytes("files/org-a/f.jsonl", b"x")
    assert sent and not any(k.lower().startswith("x-amz-checksum") for k in sent[0])
    assert os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION") is None
