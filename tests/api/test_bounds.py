"""Every input is bounded and every bad input is a clear 4xx with a `code`, on both stacks:
JSON body size (with and without Content-Length), job fields, multipart structure, JSONL
parse edge cases, store faults (503), unexpected errors (500 without their text), and
/readyz. After each refused upload nothing is stored: no row, no object, no temp file."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import func, select

from shared.jobs import retention
from shared.models import Job
from shared.storage import StoreUnavailable
from tests.api.test_files import file_rows, jsonl, stored_objects, upload
from tests.conftest import Stack
from tests.harness import free_port

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "qlora_chat_template": False,
}
JSON_LIMIT = 4096
ROW = {"text": "hello"}


# --------------------------------------------------------------------------- helpers


def error_of(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def nothing_stored(stack: Stack, tenant_id: str) -> None:
    """No file row, no object, no half-written temp file or multipart upload anywhere."""
    assert file_rows(stack, tenant_id) == 0
    assert stored_objects(stack, tenant_id) == []
    store = stack.client.app.state.store  # type: ignore[attr-defined]
    if stack.name == "embedded":
        assert [p for p in Path(store.root).rglob("*") if p.is_file()] == []
    else:
        assert store.client.list_objects_v2(Bucket=store.bucket).get("Contents", []) == []
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def job_rows(stack: Stack, tenant: dict[str, Any]) -> int:
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant["id"])
        return int(session.scalar(query) or 0)


def multipart(*parts: bytes, boundary: bytes = b"B", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def file_part(content: bytes, filename: str = "a.jsonl") -> bytes:
    return (
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode() + content


def post_multipart(stack: Stack, headers: dict[str, str], body: Any) -> Any:
    return stack.client.post(
        "/v1/files",
        content=body,
        headers={**headers, "content-type": "multipart/form-data; boundary=B"},
    )


@pytest.fixture
def limited(stack: Stack) -> Stack:
    stack.settings.max_json_body_bytes = JSON_LIMIT
    stack.settings.max_upload_bytes = 64 * 1024
    stack.settings.max_line_bytes = 4096
    stack.settings.max_multipart_fields = 4
    stack.settings.max_multipart_field_bytes = 1024
    stack.settings.max_filename_chars = 40
    return stack


@pytest.fixture
def job_tenant(limited: Stack) -> dict[str, Any]:
    stack = limited
    resp = stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny", "source": "org/tiny", "config": TINY_CONFIG},
    )
    assert resp.status_code in (200, 201, 409), resp.text  # 409: an earlier test's
    tenant_id, headers, _ = stack.new_tenant()
    resp = upload(stack, headers, jsonl(ROW, ROW))
    assert resp.status_code == 200, resp.text
    return {"id": tenant_id, "headers": headers, "file": resp.json()["id"]}


@pytest.fixture
def live_url(stack: Stack) -> Iterator[str]:
    """The stack's app behind a real uvicorn (h11), for raw HTTP: chunked bodies, truncation."""
    port = free_port()
    config = uvicorn.Config(
        stack.client.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def raw_request(address: str, head: str, chunks: list[bytes], *, chunked: bool) -> tuple[int, Any]:
    """Send `head` and the body (chunked encoding or as is) over a socket; (status, json)."""
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n")
        try:
            for chunk in chunks:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading the rest: that is the point
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    header, _, body = data.partition(b"\r\n\r\n")
    status = int(header.split(b" ")[1])
    return status, json.loads(body)


def _expected_length(data: bytes) -> int:
    header, _, _ = data.partition(b"\r\n\r\n")
    for line in header.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(header) + 4 + int(line.split(b":")[1])
    return len(data) + 1


# --------------------------------------------------------------------------- JSON bodies


def test_json_body_over_the_limit_is_413_and_at_the_limit_is_read(
    job_tenant: dict[str, Any], limited: Stack
) -> None:
    stack, headers = limited, {**job_tenant["headers"], "content-type": "application/json"}
    base = json.dumps({"model": "tiny", "training_file": job_tenant["file"], "suffix": ""})
    at_limit = base[:-2] + "x" * (JSON_LIMIT - len(base)) + '"}'
    assert len(at_limit) == JSON_LIMIT
    resp = stack.client.post("/v1/fine_tuning/jobs", content=at_limit, headers=headers)
    assert error_of(resp, 400, "invalid_value")["param"] == "suffix"  # read, then validated
    over = at_limit[:-2] + 'x"}'
    error = error_of(
        stack.client.post("/v1/fine_tuning/jobs", content=over, headers=headers),
        413,
        "request_too_large",
    )
    assert str(JSON_LIMIT) in error["message"]
    assert job_rows(stack, job_tenant) == 0


def test_chunked_json_body_without_content_length_is_stopped(
    job_tenant: dict[str, Any], limited: Stack
) -> None:
    stack = limited
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "tiny", "suffix": "'
        for _ in range(1000):
            sent += 1024
            yield b"x" * 1024
        yield b'"}'

    resp = stack.client.post(
        "/v1/fine_tuning/jobs",
        content=body(),
        headers={**job_tenant["headers"], "content-type": "application/json"},
    )
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in resp.request.headers
    error_of(resp, 413, "request_too_large")
    assert job_rows(stack, job_tenant) == 0


def test_chunked_json_body_over_real_http_is_413(
    job_tenant: dict[str, Any], limited: Stack, live_url: str
) -> None:
    head = (
        "POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: {job_tenant['headers']['Authorization']}\r\n"
        "Transfer-Encoding: chunked\r\n"
    )
    status, body = raw_request(live_url, head, [b"[" + b"1," * 1000] * 20, chunked=True)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert job_rows(limited, job_tenant) == 0


def test_the_upload_route_keeps_its_own_larger_limit(limited: Stack) -> None:
    stack = limited
    _, headers, _ = stack.new_tenant()
    body = jsonl(*[{"text": "y" * 900}] * 20)  # ~18 KB, over the 4 KiB JSON limit
    assert len(body) > JSON_LIMIT
    resp = upload(stack, headers, body)
    assert resp.status_code == 200, resp.text
    # ...but a JSON (non-multipart) body to the upload route is capped like any other
    resp = stack.client.post(
        "/v1/files",
        content=b"{" + b" " * JSON_LIMIT + b"}",
        headers={**headers, "content-type": "application/json"},
    )
    error_of(resp, 413, "request_too_large")


def test_unparsable_json_bodies_are_400_invalid_json(
    job_tenant: dict[str, Any], limited: Stack
) -> None:
    stack = limited
    stack.settings.max_json_body_bytes = 1024 * 1024
    headers = {**job_tenant["headers"], "content-type": "application/json"}
    cases = {
        "5000-digit integer": b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}",
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "invalid UTF-8": b'{"model": "\xff\xfe"}',
    }
    for case, body in cases.items():
        resp = stack.client.post("/v1/fine_tuning/jobs", content=body, headers=headers)
        error = error_of(resp, 400, "invalid_json")
        assert "Traceback" not in error["message"] and "sys." not in error["message"], case
    resp = stack.client.post("/v1/fine_tuning/jobs", content=b'{"model": ', headers=headers)
    assert error_of(resp, 400, "invalid_json")["param"] is None
    assert job_rows(stack, job_tenant) == 0


# --------------------------------------------------------------------------- job fields


def submit(stack: Stack, tenant: dict[str, Any], **body: Any) -> Any:
    return stack.client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny", "training_file": tenant["file"], **body},
        headers=tenant["headers"],
    )


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({f"k{i}": "v" for i in range(17)}, "16 pairs"),
        ({"k" * 65: "v"}, "64 characters"),
        ({"k": "v" * 513}, "512 characters"),
        ({"k": 1}, "strings"),
        ({"k": None}, "strings"),
        ({"k": {"nested": "x"}}, "strings"),
        ({"k": "nul\x00"}, "NUL"),
        (["k", "v"], "object"),
        ("k=v", "object"),
    ],
    ids=["17-pairs", "long-key", "long-value", "int", "null", "nested", "nul", "list", "str"],
)
def test_bad_metadata_is_invalid_metadata(
    job_tenant: dict[str, Any], limited: Stack, metadata: Any, words: str
) -> None:
    error = error_of(submit(limited, job_tenant, metadata=metadata), 400, "invalid_metadata")
    assert error["param"] == "metadata" and words in error["message"], error
    assert job_rows(limited, job_tenant) == 0


def test_metadata_at_its_limits_is_accepted(job_tenant: dict[str, Any], limited: Stack) -> None:
    limited.settings.max_json_body_bytes = 1024 * 1024
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    resp = submit(limited, job_tenant, metadata=metadata, suffix="s" * 64)
    assert resp.status_code == 200, resp.text
    assert resp.json()["metadata"] == metadata and resp.json()["user_provided_suffix"] == "s" * 64


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"seed": ' + "1" * 400, "seed"),
        ('"hyperparameters": {"n_epochs": ' + "1" * 400 + "}", "hyperparameters.n_epochs"),
        ('"hyperparameters": {"batch_size": ' + "1" * 400 + "}", "hyperparameters.batch_size"),
        (
            '"hyperparameters": {"learning_rate_multiplier": 1e400}',
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            '"hyperparameters": {"learning_rate_multiplier": NaN}',
            "hyperparameters.learning_rate_multiplier",
        ),
        ('"qlora": {"dropout": NaN}', "qlora.dropout"),
        ('"qlora": {"learning_rate": Infinity}', "qlora.learning_rate"),
        ('"qlora": {"max_steps": ' + "1" * 400 + "}", "qlora.max_steps"),
        ('"suffix": "' + "s" * 65 + '"', "suffix"),
        ('"suffix": "a/b"', "suffix"),
        ('"model": "tiny\\u0000"', "model"),
        ('"training_file": "file-\\ud800"', "training_file"),
        ('"integrations": [{}]', "integrations.0.type"),
    ],
)
def test_absurd_values_are_clear_400s(
    job_tenant: dict[str, Any], limited: Stack, raw: str, param: str
) -> None:
    body = json.dumps({"model": "tiny", "training_file": job_tenant["file"]})[:-1] + ", " + raw
    resp = limited.client.post(
        "/v1/fine_tuning/jobs",
        content=body + "}",
        headers={**job_tenant["headers"], "content-type": "application/json"},
    )
    assert error_of(resp, 400, "invalid_value")["param"] == param
    assert job_rows(limited, job_tenant) == 0


# --------------------------------------------------------------------------- multipart


def test_too_many_parts_is_refused(limited: Stack) -> None:
    tenant, headers, _ = limited.new_tenant()
    parts = [field(f"f{i}", b"x") for i in range(4)] + [file_part(jsonl(ROW))]
    error_of(post_multipart(limited, headers, multipart(*parts)), 400, "too_many_parts")
    nothing_stored(limited, tenant)
    ok = [field("purpose", b"fine-tune"), field("a", b"x"), field("b", b"y"), file_part(jsonl(ROW))]
    assert post_multipart(limited, headers, multipart(*ok)).status_code == 200


def test_oversized_form_field_is_413(limited: Stack) -> None:
    tenant, headers, _ = limited.new_tenant()
    body = multipart(field("purpose", b"f" * 1025), file_part(jsonl(ROW)))
    error = error_of(post_multipart(limited, headers, body), 413, "field_too_large")
    assert error["param"] == "purpose" and "1024" in error["message"]
    nothing_stored(limited, tenant)


def test_chunked_upload_is_stopped_at_the_file_limit(limited: Stack) -> None:
    tenant, headers, _ = limited.new_tenant()
    line = b'{"text": "' + b"z" * 1000 + b'"}\n'

    def body() -> Iterator[bytes]:
        yield b"--B\r\n" + field("purpose", b"fine-tune") + b"\r\n--B\r\n"
        yield file_part(b"")
        for _ in range(200):  # ~200 KB, over the 64 KiB limit
            yield line
        yield b"\r\n--B--\r\n"

    resp = post_multipart(limited, headers, body())
    assert "content-length" not in resp.request.headers
    error_of(resp, 413, "file_too_large")
    nothing_stored(limited, tenant)


def test_chunked_upload_over_real_http_is_stopped(limited: Stack, live_url: str) -> None:
    tenant, headers, _ = limited.new_tenant()
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\n"
    )
    line = b'{"text": "' + b"z" * 1000 + b'"}\n'
    chunks = [b"--B\r\n" + field("purpose", b"fine-tune") + b"\r\n--B\r\n" + file_part(b"")]
    chunks += [line * 10] * 20 + [b"\r\n--B--\r\n"]
    status, body = raw_request(live_url, head, chunks, chunked=True)
    assert status == 413 and body["error"]["code"] == "file_too_large"
    nothing_stored(limited, tenant)


@pytest.mark.parametrize(
    "body",
    [
        b"no boundary at all, just bytes",
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n--B--junk',
        b"--B\r\n" + b"X-Header: " + b"h" * 20_000 + b"\r\n\r\nbody\r\n--B--\r\n",
        b"--B\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(20)) + b"\r\nx\r\n--B--\r\n",
        b"--B  x\r\n",
    ],
    ids=["garbage", "bad-close", "huge-header", "many-headers", "bad-padding"],
)
def test_malformed_multipart_is_400(limited: Stack, body: bytes) -> None:
    tenant, headers, _ = limited.new_tenant()
    error_of(post_multipart(limited, headers, body), 400, "invalid_multipart")
    nothing_stored(limited, tenant)


def test_boundary_parameter_is_required(limited: Stack) -> None:
    _, headers, _ = limited.new_tenant()
    resp = limited.client.post(
        "/v1/files", content=b"x", headers={**headers, "content-type": "multipart/form-data"}
    )
    error_of(resp, 400, "invalid_multipart")


def test_missing_closing_boundary_stores_nothing(limited: Stack) -> None:
    tenant, headers, _ = limited.new_tenant()
    valid = jsonl(ROW, ROW, ROW)
    body = multipart(field("purpose", b"fine-tune"), file_part(valid), close=False)
    error = error_of(post_multipart(limited, headers, body), 400, "invalid_multipart")
    assert "closing boundary" in error["message"]
    nothing_stored(limited, tenant)
    # the same body, closed, is accepted
    assert post_multipart(limited, headers, body + b"--B--\r\n").status_code == 200


def test_truncated_upload_over_real_http_stores_nothing(limited: Stack, live_url: str) -> None:
    tenant, headers, _ = limited.new_tenant()
    body = multipart(field("purpose", b"fine-tune"), file_part(jsonl(ROW) * 50), close=False)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Authorization: {headers['Authorization']}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\n"
    )
    status, answer = raw_request(live_url, head, [body], chunked=False)
    assert status == 400 and answer["error"]["code"] == "invalid_multipart"
    nothing_stored(limited, tenant)


def test_filename_length_limit(limited: Stack) -> None:
    tenant, headers, _ = limited.new_tenant()
    error = error_of(
        upload(limited, headers, jsonl(ROW), filename="n" * 41), 400, "filename_too_long"
    )
    assert error["param"] == "file" and "40" in error["message"]
    nothing_stored(limited, tenant)
    resp = upload(limited, headers, jsonl(ROW), filename="n" * 40)
    assert resp.status_code == 200 and resp.json()["filename"] == "n" * 40


# --------------------------------------------------------------------------- JSONL lines


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"text": "a", "weight": ' + b"7" * 5000 + b"}", "too many digits"),
        (b'{"text": "a", "weight": NaN}', "NaN"),
        (b'{"text": "a", "weight": -Infinity}', "Infinity"),
        (b'{"text": "a", "weight": 1e999}', "out of range"),
        (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
        (b'{"text": "caf\xc3"}', "UTF-8"),
        (b'\xef\xbb\xbf{"text": "a"}', "byte order mark"),
    ],
    ids=["huge-int", "nan", "infinity", "float-overflow", "deep", "bad-utf8", "bom"],
)
def test_jsonl_parse_edge_cases_name_the_line(stack: Stack, line: bytes, reason: str) -> None:
    stack.settings.max_line_bytes = 64 * 1024
    tenant, headers, _ = stack.new_tenant()
    body = jsonl(ROW) + line + b"\n" + jsonl(ROW)
    error = error_of(upload(stack, headers, body), 400, "invalid_file")
    assert [e["line"] for e in error["lines"]] == [2], error
    assert reason in error["lines"][0]["reason"] and "line 2" in error["message"]
    nothing_stored(stack, tenant)


# --------------------------------------------------------------------------- faults


def test_store_unavailable_is_503_with_retry_after(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, headers, _ = stack.new_tenant()
    file_id = upload(stack, headers, jsonl(ROW)).json()["id"]
    store = stack.client.app.state.store  # type: ignore[attr-defined]

    def down(*_: Any, **__: Any) -> Any:
        raise StoreUnavailable("put files/t/x: endpoint s3.internal.example refused")

    monkeypatch.setattr(store, "open_writer", down)
    monkeypatch.setattr(store, "iter_chunks", down)
    for resp in (
        upload(stack, headers, jsonl(ROW)),
        stack.client.get(f"/v1/files/{file_id}/content", headers=headers),
    ):
        error_of(resp, 503, "store_unavailable")
        assert resp.headers["retry-after"].isdigit()
        assert "internal.example" not in resp.text
    assert file_rows(stack, tenant) == 1


def test_delete_after_commit_never_answers_5xx(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, headers, _ = stack.new_tenant()
    file_id = upload(stack, headers, jsonl(ROW)).json()["id"]
    store = stack.client.app.state.store  # type: ignore[attr-defined]

    def down(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("delete: connection reset")

    monkeypatch.setattr(store, "delete", down)
    resp = stack.client.delete(f"/v1/files/{file_id}", headers=headers)
    assert resp.status_code == 200 and resp.json()["deleted"] is True
    assert file_rows(stack, tenant) == 0
    # The object stays scheduled, and goes once the store takes deletes again (the sweeper).
    assert stored_objects(stack, tenant) != []
    monkeypatch.undo()
    sessions = stack.client.app.state.sessions  # type: ignore[attr-defined]
    assert retention.drain_deletions(sessions, store) == 1
    assert stored_objects(stack, tenant) == []


def test_unexpected_errors_are_500_without_their_text(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers, _ = stack.new_tenant()

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("password=hunter2 host=db.internal.example")

    monkeypatch.setattr("shared.files.service.list_files", boom)
    resp = stack.client.get("/v1/files", headers=headers)
    assert resp.json() == {
        "error": {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert resp.status_code == 500 and "hunter2" not in resp.text


def test_job_create_after_commit_never_answers_5xx(
    job_tenant: dict[str, Any], limited: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    def db_blip(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the database went away after the commit")

    monkeypatch.setattr("shared.jobs.outbox.publish", db_blip)
    resp = submit(limited, job_tenant)
    assert job_rows(limited, job_tenant) == 1  # committed
    assert resp.status_code == 200, resp.text


# --------------------------------------------------------------------------- readiness


def test_readyz_names_the_failing_dependency_only(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = stack.client.get("/readyz")
    assert ok.status_code == 200 and ok.json()["failing"] == []
    store = stack.client.app.state.store  # type: ignore[attr-defined]
    secrets = ["hunter2", "db.internal.example", "root", "127.0.0.1"]
    if stack.name == "embedded":
        secrets.append(str(store.root))
        monkeypatch.setattr(store, "root", Path(store.root) / "missing" / "objects")
    else:
        secrets.append(store.bucket)
        monkeypatch.setattr(store, "bucket", "no-such-bucket-here")
        secrets.append("no-such-bucket-here")

    class DeadSessions:
        def __call__(self) -> Any:
            raise RuntimeError("could not connect to root:hunter2@db.internal.example:5432")

    monkeypatch.setattr(stack.client.app.state, "sessions", DeadSessions())  # type: ignore[attr-defined]
    monkeypatch.setattr(stack.settings, "broker_url", "redis://root:hunter2@127.0.0.1:1/0")
    resp = stack.client.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "not_ready"
    assert body["failing"] == ["database", "object_store", "broker"]
    assert body["checks"]["object_store"] == "error" and body["checks"]["database"] == "error"
    for secret in secrets:
        assert secret not in resp.text, secret


def test_non_latin1_filename_is_kept_and_counted_in_characters(limited: Stack) -> None:
    _, headers, _ = limited.new_tenant()
    name = "données-日本語" + "字" * 29  # 40 characters, 100+ UTF-8 bytes
    assert len(name) == 40
    resp = upload(limited, headers, jsonl(ROW), filename=name)
    assert resp.status_code == 200, resp.text
    assert resp.json()["filename"] == name


def test_nul_in_a_url_is_400_not_a_database_error(
    job_tenant: dict[str, Any], limited: Stack
) -> None:
    headers = job_tenant["headers"]
    for path in (
        "/v1/files/file-%00",
        "/v1/files?after=file-%00",
        f"/v1/fine_tuning/jobs/ftjob-%00/events?after={job_tenant['file']}",
        "/v1/fine_tuning/jobs?after=%00",
    ):
        error = error_of(limited.client.get(path, headers=headers), 400, "invalid_request")
        assert "NUL" in error["message"], path
