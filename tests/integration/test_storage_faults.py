"""The object store under faults: S3 through a fault-injecting proxy in front of moto's server
over HTTP (resets, 503s, lost answers, stalls, outages), and the folder store's disk faults.
A fault becomes a retry or `StoreUnavailable`, never a hang, a silent loss or a half upload."""

from __future__ import annotations

import errno
import io
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
)
from botocore.stub import Stubber

from shared.jobs.faults import TransientFault, classify, retry_transient
from shared.storage import (
    PART_SIZE,
    FolderStore,
    ObjectNotFound,
    S3Store,
    StoreUnavailable,
    is_transient_s3_error,
)
from tests.conftest import SIGNING_SECRET, MotoS3
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

SMALL = b"0123456789" * 1000
MULTIPART = PART_SIZE + 4321  # two parts


@pytest.fixture
def proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    host, port = moto_s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), seed=7).start()
    yield proxy
    proxy.stop()


def store_via(
    proxy: FaultProxy, moto_s3: MotoS3, *, attempts: int = 3, read: float = 1.0
) -> S3Store:
    return S3Store(
        moto_s3.new_bucket(),
        endpoint_url=proxy.url,
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout=1.0,
        read_timeout=read,
        max_attempts=attempts,
    )


def open_uploads(store: S3Store) -> list[dict[str, object]]:
    uploads: list[dict[str, object]] = store.client.list_multipart_uploads(Bucket=store.bucket).get(
        "Uploads", []
    )
    return uploads


class SwitchingStream(io.RawIOBase):
    """`size` zero bytes; before reading past `switch_at`, `on_switch` runs (once)."""

    def __init__(self, size: int, switch_at: int, on_switch: Callable[[], None]) -> None:
        self.remaining, self.read_so_far = size, 0
        self.switch_at, self.on_switch = switch_at, on_switch

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self.remaining)
        if self.read_so_far < self.switch_at:
            n = min(n, self.switch_at - self.read_so_far)
        elif self.switch_at >= 0:
            self.on_switch()
            self.switch_at = -1
        buffer[:n] = b"\0" * n
        self.remaining -= n
        self.read_so_far += n
        return n


def zeros(size: int) -> BinaryIO:
    return SwitchingStream(size, size, lambda: None)  # type: ignore[return-value]


def fail_with(exc: OSError) -> Callable[[int], None]:
    def fsync(fd: int) -> None:
        raise exc

    return fsync


# --------------------------------------------------------------------------- ridden through


@pytest.mark.parametrize("mode", ["reset", "http_503", "drop_response"])
def test_uploads_and_downloads_ride_through_a_fault(
    proxy: FaultProxy, moto_s3: MotoS3, mode: str
) -> None:
    store = store_via(proxy, moto_s3, attempts=2)
    big = bytes(range(256)) * (MULTIPART // 256 + 1)
    for key, data in (("files/org-a/small.jsonl", SMALL), ("files/org-a/big.jsonl", big)):
        proxy.set_mode(mode, times=1)  # the next connection is faulted, boto's retry passes
        store.put_bytes(key, data)
        proxy.set_mode(mode, times=1)
        assert store.get_bytes(key) == data
    assert proxy.stats[mode] == 4 and proxy.mode == "pass"
    if mode == "drop_response":
        # the lost answer was CreateMultipartUpload's: its upload id never reached us, so the
        # upload it opened can only be found by listing, which is the sweep's job
        assert len(open_uploads(store)) == 1
        assert store.abort_stale_uploads(timedelta(0)) == 1
    assert open_uploads(store) == []


def test_a_lost_completion_answer_is_settled_by_verification(
    proxy: FaultProxy, moto_s3: MotoS3
) -> None:
    """boto retries a CompleteMultipartUpload whose answer was lost; the store then says
    NoSuchUpload, because the first try completed it. That is a success, not a failure."""
    store = store_via(proxy, moto_s3, attempts=2)
    writer = store.open_writer("checkpoints/org-a/job/attempt-1/step-1/adapter.bin")
    writer.write(b"\1" * PART_SIZE)  # exactly one part: commit only completes
    proxy.set_mode("drop_response", times=1)
    writer.commit()
    assert proxy.stats["drop_response"] == 1
    assert store.size("checkpoints/org-a/job/attempt-1/step-1/adapter.bin") == PART_SIZE
    assert open_uploads(store) == []


def answer_no_such_upload(store: S3Store, *, complete_first: bool) -> Callable[..., None]:
    """CompleteMultipartUpload as S3 or MinIO answer it when the upload is gone: after boto
    retried a completion that succeeded, or when a sweep aborted the upload."""
    real_complete = store.client.raw.complete_multipart_upload

    def complete(**params: Any) -> None:
        if complete_first:
            real_complete(**params)
        error: Any = {"Error": {"Code": "NoSuchUpload"}}
        raise store.client.raw.exceptions.NoSuchUpload(error, "CompleteMultipartUpload")

    return complete


def test_a_completion_retry_answered_no_such_upload_is_settled_by_verification(
    proxy: FaultProxy, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto (like S3) answers a repeated completion with success; MinIO answers NoSuchUpload.
    That answer, after a first try that completed, is a success too."""
    store = store_via(proxy, moto_s3)
    lost = answer_no_such_upload(store, complete_first=True)
    monkeypatch.setattr(store.client.raw, "complete_multipart_upload", lost)
    writer = store.open_writer("checkpoints/org-a/job/attempt-1/step-1/adapter.bin")
    writer.write(b"\1" * (PART_SIZE + 3))
    writer.commit()
    assert store.size("checkpoints/org-a/job/attempt-1/step-1/adapter.bin") == PART_SIZE + 3


def test_an_upload_gone_before_completion_is_store_unavailable(
    proxy: FaultProxy, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Swept away mid-way: uploading again is the cure, so the fault is transient."""
    store = store_via(proxy, moto_s3)
    gone = answer_no_such_upload(store, complete_first=False)
    monkeypatch.setattr(store.client.raw, "complete_multipart_upload", gone)
    writer = store.open_writer("checkpoints/org-a/job/attempt-1/step-1/adapter.bin")
    writer.write(b"\1" * PART_SIZE)
    with pytest.raises(StoreUnavailable, match="not verified"):
        writer.commit()


def test_a_soak_at_a_fifth_of_connections_faulted_loses_nothing(
    proxy: FaultProxy, moto_s3: MotoS3
) -> None:
    store = store_via(proxy, moto_s3)
    proxy.set_mode("mix", fault_rate=0.2)
    for i in range(30):
        data = f"object {i} ".encode() * 1000
        retry_transient(
            lambda i=i, data=data: store.put_bytes(f"files/org-a/{i}.jsonl", data),  # type: ignore[misc]
            what="put",
            budget_s=30,
            first_delay_s=0.05,
        )
    for i in range(30):
        got = retry_transient(
            lambda i=i: store.get_bytes(f"files/org-a/{i}.jsonl"),  # type: ignore[misc]
            what="get",
            budget_s=30,
            first_delay_s=0.05,
        )
        assert got == f"object {i} ".encode() * 1000
    assert proxy.stats["faults"] >= 5  # the faults really happened


# --------------------------------------------------------------------------- StoreUnavailable


BAD_GATEWAY: Any = {"Error": {"Code": "BadGateway"}, "ResponseMetadata": {"HTTPStatusCode": 502}}


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (IncompleteReadError(actual_bytes=1, expected_bytes=2), True),
        (EndpointConnectionError(endpoint_url="http://store"), True),
        (ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"), True),
        (ClientError(BAD_GATEWAY, "GetObject"), True),
        (ClientError({"Error": {"Code": "AccessDenied"}}, "PutObject"), False),
        (ClientError({"Error": {"Code": "NoSuchBucket"}}, "PutObject"), False),
    ],
)
def test_what_counts_as_transient(exc: Exception, transient: bool) -> None:
    assert is_transient_s3_error(exc) is transient


@pytest.mark.parametrize("mode", ["reset", "http_503", "drop_response", "down"])
def test_a_fault_outlasting_botos_retries_is_store_unavailable(
    proxy: FaultProxy, moto_s3: MotoS3, mode: str
) -> None:
    store = store_via(proxy, moto_s3, attempts=2)
    store.put_bytes("files/org-a/a.jsonl", b"first")
    proxy.set_mode(mode)
    with pytest.raises(StoreUnavailable) as put_failed:
        store.put_bytes("files/org-a/b.jsonl", b"second")
    with pytest.raises(StoreUnavailable):
        store.get_bytes("files/org-a/a.jsonl")
    with pytest.raises(StoreUnavailable):
        store.check()
    assert classify(put_failed.value).transient  # the worker retries it, then requeues
    if mode != "down":
        assert proxy.stats[mode] == 2 * 3  # two tries per call, no more
    proxy.set_mode("pass")
    assert store.get_bytes("files/org-a/a.jsonl") == b"first"


def test_a_long_outage_does_not_use_up_the_clients_retries(
    proxy: FaultProxy, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore's standard retry mode keeps a per-client retry quota (500 tokens, 5 per retried
    error, 10 per connection error) that drains in a long outage and then stops retrying for
    good: a worker's client fails every later blip on its first try. Ours retries the same on
    the hundredth faulted call as on the first."""
    import botocore.retryhandler

    # no back-off sleeps between the two tries (only the count matters here); the client
    # binds the delay function when it is created
    monkeypatch.setattr(botocore.retryhandler, "delay_exponential", lambda **_: 0.0)
    store = store_via(proxy, moto_s3, attempts=2)
    proxy.set_mode("reset")
    for _ in range(120):
        with pytest.raises(StoreUnavailable):
            store.size("files/org-a/a.jsonl")
    before = proxy.stats["reset"]
    with pytest.raises(StoreUnavailable):
        store.size("files/org-a/a.jsonl")
    assert proxy.stats["reset"] - before == 2  # still two tries per call
    proxy.set_mode("pass")


def test_a_stall_is_cut_by_the_read_timeout(proxy: FaultProxy, moto_s3: MotoS3) -> None:
    store = store_via(proxy, moto_s3, attempts=2, read=0.5)
    assert store.client.raw.meta.config.read_timeout == 0.5  # what the settings asked for
    store.put_bytes("files/org-a/a.jsonl", b"first")
    proxy.set_mode("stall")
    for call in (
        lambda: store.put_bytes("files/org-a/b.jsonl", b"second"),
        lambda: store.get_bytes("files/org-a/a.jsonl"),
    ):
        with pytest.raises(StoreUnavailable) as failed:
            call()
        # the configured read timeout ended it, once per try: no hang, no endless retry
        assert isinstance(failed.value.__cause__, ReadTimeoutError)
    assert proxy.stats["stall"] == 2 * 2
    proxy.set_mode("pass")
    assert store.get_bytes("files/org-a/a.jsonl") == b"first"


def test_a_download_reset_midway_is_store_unavailable(proxy: FaultProxy, moto_s3: MotoS3) -> None:
    store = store_via(proxy, moto_s3)
    size = 24 * 1024 * 1024  # more than the socket buffers on the way hold
    store.put_stream("files/org-a/big.jsonl", zeros(size))
    chunks = store.iter_chunks("files/org-a/big.jsonl", chunk_size=64 * 1024)
    assert len(next(chunks)) == 64 * 1024
    proxy.set_mode("reset")  # resets the connection the body is arriving on
    with pytest.raises(StoreUnavailable):
        for _ in chunks:
            pass


def test_retry_budget_ends_in_a_transient_fault(proxy: FaultProxy, moto_s3: MotoS3) -> None:
    store = store_via(proxy, moto_s3, attempts=1)
    proxy.set_mode("down")
    with pytest.raises(TransientFault):
        retry_transient(
            lambda: store.put_bytes("files/org-a/x.jsonl", b"x"),
            what="put",
            budget_s=1.0,
            first_delay_s=0.1,
        )


# --------------------------------------------------------------------------- no half uploads


@pytest.mark.parametrize("dies_at", [PART_SIZE, 2 * PART_SIZE], ids=["in-write", "in-commit"])
def test_a_multipart_upload_that_dies_midway_aborts_itself(
    proxy: FaultProxy, moto_s3: MotoS3, dies_at: int
) -> None:
    store = store_via(proxy, moto_s3, attempts=1)
    # parts go up until `dies_at`; then the next part's connection is reset, and nothing
    # retries: the second part (sent by a write) or the last one (sent by the commit)
    stream = SwitchingStream(2 * PART_SIZE + 10, dies_at, lambda: proxy.set_mode("reset", times=1))
    with pytest.raises(StoreUnavailable):
        store.put_stream("checkpoints/org-a/job/attempt-1/step-1/big.bin", stream)  # type: ignore[arg-type]
    assert proxy.stats["reset"] == 1
    assert open_uploads(store) == []  # the abort reached the store
    assert store.list_keys("checkpoints/org-a/") == []


def test_an_upload_left_by_a_killed_process_is_aborted_by_the_sweep(
    proxy: FaultProxy, moto_s3: MotoS3
) -> None:
    store = store_via(proxy, moto_s3, attempts=1)
    writer = store.open_writer("checkpoints/org-a/job/attempt-1/step-1/big.bin")
    writer.write(b"\0" * (PART_SIZE + 1024))  # one part up: a multipart upload is open
    proxy.set_mode("reset")
    with pytest.raises(StoreUnavailable):
        writer.write(b"\0" * PART_SIZE)  # the next part dies...
    writer.abort()  # ...and so does the abort: as if the process had been killed
    proxy.set_mode("pass")
    assert len(open_uploads(store)) == 1
    # moto reports every upload as initiated in 2010, so all of them are stale here; the
    # cut-off itself is checked against a stubbed listing below
    assert store.abort_stale_uploads(timedelta(hours=1)) == 1
    assert open_uploads(store) == []
    assert store.list_keys("checkpoints/org-a/") == []


def test_abort_stale_uploads_keeps_recent_ones() -> None:
    store = S3Store(
        "bucket", endpoint_url="http://127.0.0.1:9", access_key_id="x", secret_access_key="x"
    )
    now = datetime.now(UTC)
    listing = {
        "Bucket": "bucket",
        "Uploads": [
            {"Key": "a/old", "UploadId": "u-old", "Initiated": now - timedelta(hours=25)},
            {"Key": "a/new", "UploadId": "u-new", "Initiated": now - timedelta(hours=1)},
        ],
    }
    with Stubber(store.client.raw) as stub:
        stub.add_response("list_multipart_uploads", listing, {"Bucket": "bucket"})
        stub.add_response(
            "abort_multipart_upload", {}, {"Bucket": "bucket", "Key": "a/old", "UploadId": "u-old"}
        )
        assert store.abort_stale_uploads(timedelta(hours=24)) == 1
        stub.assert_no_pending_responses()


def test_verification_catches_a_truncated_object(
    proxy: FaultProxy, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = store_via(proxy, moto_s3)
    real_size = store.size
    monkeypatch.setattr(store, "size", lambda key: real_size(key) - 1)  # the store lost a byte
    with pytest.raises(StoreUnavailable, match="not verified"):
        store.put_bytes("files/org-a/t.jsonl", b"0123456789")
    writer = store.open_writer("files/org-a/u.jsonl")  # a streamed upload (the files API)
    writer.write(b"x" * (PART_SIZE + 1))
    with pytest.raises(StoreUnavailable, match="not verified"):
        writer.commit()
    (tmp_path / "adapter_config.json").write_bytes(b"{}")
    with pytest.raises(StoreUnavailable, match="not verified"):
        store.upload_dir("adapters/org-a/ad-1", tmp_path)


# --------------------------------------------------------------------------- the folder store


def test_folder_store_disk_trouble_is_store_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET)
    monkeypatch.setattr(os, "fsync", fail_with(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(StoreUnavailable):
        store.put_bytes("files/org-a/f.jsonl", b"data")
    assert list((tmp_path / "objects").rglob("*.part")) == []  # the temporary file is gone
    monkeypatch.setattr(os, "fsync", fail_with(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # not transient: a retry would not help
        store.put_bytes("files/org-a/f.jsonl", b"data")
    monkeypatch.undo()
    with pytest.raises(ObjectNotFound):
        store.size("files/org-a/f.jsonl")  # nothing half-written became visible


def test_folder_store_sweeps_stale_temporary_files(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET)
    folder = tmp_path / "objects" / "files" / "org-a"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".upload-old.part", folder / ".upload-new.part"
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"still being written")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))
    assert store.abort_stale_uploads(timedelta(hours=24)) == 1
    assert not stale.exists() and fresh.exists()
