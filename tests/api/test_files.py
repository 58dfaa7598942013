"""Files API on both stacks: round trip, pagination, tenancy, auth, and the bad-input corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared.models import File
from tests.conftest import Stack

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*rows: object) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def upload(
    stack: Stack,
    headers: dict[str, str],
    body: bytes,
    filename: str = "train.jsonl",
    purpose: str | None = "fine-tune",
):  # type: ignore[no-untyped-def]
    data = {"purpose": purpose} if purpose is not None else {}
    return stack.client.post(
        "/v1/files",
        files={"file": (filename, body, "application/jsonl")},
        data=data,
        headers=headers,
    )


def stored_objects(stack: Stack, tenant_id: str) -> list[str]:
    """Every object under the tenant's file prefix, including half-written temp files."""
    store = stack.client.app.state.store  # type: ignore[attr-defined]
    if stack.name == "embedded":
        folder = Path(store.root) / "files" / tenant_id
        return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    keys = store.list_keys(f"files/{tenant_id}")
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return keys + [u["Key"] for u in uploads if u["Key"].startswith(f"files/{tenant_id}/")]


def file_rows(stack: Stack, tenant_id: str) -> int:
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        return int(
            session.scalar(
                select(func.count()).select_from(File).where(File.tenant_id == tenant_id)
            )
            or 0
        )


def test_upload_round_trip_with_stats(stack: Stack) -> None:
    tenant, headers, _ = stack.new_tenant()
    body = jsonl(
        CHAT, CHAT, {"messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]]}
    )
    resp = upload(stack, headers, body)
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert obj["id"].startswith("file-")
    assert (
        obj["object"] == "file" and obj["status"] == "processed" and obj["purpose"] == "fine-tune"
    )
    assert obj["format"] == "chat" and obj["rows"] == 3 and obj["bytes"] == len(body)
    assert obj["stats"]["messages"] == 7 and obj["stats"]["chars"] == 3 * 7 + 8
    import hashlib

    assert obj["sha256"] == hashlib.sha256(body).hexdigest()
    assert stack.client.get(f"/v1/files/{obj['id']}", headers=headers).json() == obj
    content = stack.client.get(f"/v1/files/{obj['id']}/content", headers=headers)
    assert content.status_code == 200 and content.content == body
    assert stored_objects(stack, tenant) == (
        [f"{obj['id']}.jsonl"]
        if stack.name == "embedded"
        else [f"files/{tenant}/{obj['id']}.jsonl"]
    )


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"instruction": "add", "input": "2 2", "output": "4"}, "alpaca"),
        ({"text": "plain text"}, "text"),
    ],
)
def test_each_format_is_detected(stack: Stack, row: dict[str, str], fmt: str) -> None:
    _, headers, _ = stack.new_tenant()
    resp = upload(stack, headers, jsonl(row, row))
    assert resp.status_code == 200, resp.text
    assert resp.json()["format"] == fmt and resp.json()["rows"] == 2


def test_list_paginates_newest_first_and_delete_removes_object(stack: Stack) -> None:
    tenant, headers, _ = stack.new_tenant()
    ids = [upload(stack, headers, jsonl({"text": f"row {i}"})).json()["id"] for i in range(5)]
    page = stack.client.get("/v1/files?limit=2", headers=headers).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    seen = [f["id"] for f in page["data"]]
    while page["has_more"]:
        page = stack.client.get(f"/v1/files?limit=2&after={seen[-1]}", headers=headers).json()
        seen += [f["id"] for f in page["data"]]
    assert seen == ids[::-1]
    assert stack.client.get("/v1/files?purpose=batch", headers=headers).json()["data"] == []
    assert len(stack.client.get("/v1/files?purpose=fine-tune", headers=headers).json()["data"]) == 5
    resp = stack.client.delete(f"/v1/files/{ids[0]}", headers=headers)
    assert resp.status_code == 200 and resp.json() == {
        "id": ids[0],
        "object": "file",
        "deleted": True,
    }
    assert stack.client.get(f"/v1/files/{ids[0]}", headers=headers).status_code == 404
    assert len(stored_objects(stack, tenant)) == 4 and file_rows(stack, tenant) == 4


def test_other_tenant_gets_404_everywhere(stack: Stack) -> None:
    _, owner, _ = stack.new_tenant("owner")
    _, intruder, _ = stack.new_tenant("intruder")
    file_id = upload(stack, owner, jsonl({"text": "secret"})).json()["id"]
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        resp = stack.client.request(method, path, headers=intruder)
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["code"] == "not_found"
    assert stack.client.get("/v1/files", headers=intruder).json()["data"] == []
    assert stack.client.get(f"/v1/files?after={file_id}", headers=intruder).status_code == 404
    assert stack.client.get(f"/v1/files/{file_id}", headers=owner).status_code == 200


def test_no_wrong_and_revoked_keys_get_401(stack: Stack) -> None:
    _, headers, key_id = stack.new_tenant()
    file_id = upload(stack, headers, jsonl({"text": "x"})).json()["id"]
    endpoints = [
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]
    wrong = {"Authorization": "Bearer qlsk-" + "A" * 43}
    garbage = {"Authorization": "Basic dXNlcjpwYXNz"}
    for auth in ({}, wrong, garbage, {"Authorization": headers["Authorization"] + "x"}):
        for method, path in endpoints:
            resp = stack.client.request(method, path, headers=auth)
            assert resp.status_code == 401, (auth, method, path)
            assert resp.json()["error"]["code"] == "invalid_api_key"
    assert stack.client.delete(f"/admin/keys/{key_id}", headers=stack.admin).status_code == 200
    for method, path in endpoints:
        assert stack.client.request(method, path, headers=headers).status_code == 401
    # the admin key is not a tenant key, and a tenant key is not an admin key
    assert stack.client.get("/v1/files", headers=stack.admin).status_code == 401


BAD_INPUTS: list[tuple[str, bytes, str, int, str, list[int]]] = [
    # id, body, filename, status, code, lines reported
    ("empty", b"", "a.jsonl", 400, "invalid_file", [0]),
    ("blank-only", b"\n\n  \n", "a.jsonl", 400, "invalid_file", [0]),
    ("not-utf8", b'{"text": "caf\xe9"}\n', "a.jsonl", 400, "invalid_file", [1]),
    ("binary", bytes(range(256)) * 4, "a.bin", 400, "invalid_file", [1, 2, 3, 4, 5]),
    ("not-json", b'{"text": "ok"}\n{"text": oops}\n', "a.jsonl", 400, "invalid_file", [2]),
    ("array-line", b'[{"text": "x"}]\n', "a.jsonl", 400, "invalid_file", [1]),
    ("wrong-fields", b'{"question": "q", "answer": "a"}\n', "a.jsonl", 400, "invalid_file", [1]),
    (
        "extra-field",
        b'{"prompt": "q", "completion": "a", "label": 1}\n',
        "a.jsonl",
        400,
        "invalid_file",
        [1],
    ),
    (
        "no-assistant",
        jsonl({"messages": [{"role": "user", "content": "hi"}]}),
        "a.jsonl",
        400,
        "invalid_file",
        [1],
    ),
    (
        "bad-role",
        jsonl({"messages": [{"role": "bot", "content": "hi"}]}),
        "a.jsonl",
        400,
        "invalid_file",
        [1],
    ),
    (
        "mixed",
        jsonl({"text": "a"}, {"prompt": "q", "completion": "a"}),
        "a.jsonl",
        400,
        "invalid_file",
        [2],
    ),
    (
        "over-long-line",
        b'{"text": "' + b"x" * 5000 + b'"}\n{"text": "ok"}\n',
        "a.jsonl",
        400,
        "invalid_file",
        [1],
    ),
    ("traversal-name", jsonl({"text": "a"}), "../../etc/passwd", 400, "invalid_filename", []),
    ("nul-name", jsonl({"text": "a"}), "evil\x00.jsonl", 400, "invalid_filename", []),
    ("backslash-name", jsonl({"text": "a"}), "..\\..\\win.ini", 400, "invalid_filename", []),
]


@pytest.fixture
def small_limits_stack(stack: Stack) -> Stack:
    stack.settings.max_line_bytes = 4096
    stack.settings.max_upload_bytes = 64 * 1024
    return stack


@pytest.mark.parametrize(
    ("case", "body", "filename", "status", "code", "lines"),
    BAD_INPUTS,
    ids=[c[0] for c in BAD_INPUTS],
)
def test_bad_input_is_rejected_and_leaves_nothing(
    small_limits_stack: Stack,
    case: str,
    body: bytes,
    filename: str,
    status: int,
    code: str,
    lines: list[int],
) -> None:
    stack = small_limits_stack
    tenant, headers, _ = stack.new_tenant()
    resp = upload(stack, headers, body, filename=filename)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code and error["param"] == "file" and error["message"]
    if code == "invalid_file":
        assert [entry["line"] for entry in error["lines"]] == lines
        assert all(entry["reason"] for entry in error["lines"])
    assert stored_objects(stack, tenant) == [] and file_rows(stack, tenant) == 0


def test_one_byte_over_the_limit_is_413_and_exact_limit_passes(small_limits_stack: Stack) -> None:
    stack = small_limits_stack
    tenant, headers, _ = stack.new_tenant()
    limit = stack.settings.max_upload_bytes
    line = b'{"text": "' + b"y" * 990 + b'"}\n'  # 1001 bytes
    body = line * (limit // len(line))
    body += b'{"text": "' + b"z" * (limit - len(body) - 13) + b'"}\n'
    assert len(body) == limit
    ok = upload(stack, headers, body)
    assert ok.status_code == 200, ok.text
    assert ok.json()["bytes"] == limit
    over = upload(stack, headers, body + b"\n")
    assert over.status_code == 413
    assert over.json()["error"] == {
        "message": f"the file is larger than the limit of {limit} bytes",
        "type": "invalid_request_error",
        "param": "file",
        "code": "file_too_large",
    }
    assert len(stored_objects(stack, tenant)) == 1 and file_rows(stack, tenant) == 1


def test_raw_nul_byte_in_filename_header_is_refused(stack: Stack) -> None:
    tenant, headers, _ = stack.new_tenant()
    body = (
        b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.jsonl"\r\n'
        b'Content-Type: application/jsonl\r\n\r\n{"text": "a"}\n\r\n--B--\r\n'
    )
    resp = stack.client.post(
        "/v1/files",
        content=body,
        headers={**headers, "content-type": "multipart/form-data; boundary=B"},
    )
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_filename"
    assert stored_objects(stack, tenant) == [] and file_rows(stack, tenant) == 0


def test_many_errors_are_capped_at_twenty_lines(stack: Stack) -> None:
    tenant, headers, _ = stack.new_tenant()
    resp = upload(stack, headers, b"nope\n" * 50)
    error = resp.json()["error"]
    assert resp.status_code == 400 and len(error["lines"]) == 20
    assert "50 problem(s)" in error["message"]
    assert stored_objects(stack, tenant) == []


def test_missing_or_wrong_purpose_and_missing_file_part(stack: Stack) -> None:
    tenant, headers, _ = stack.new_tenant()
    for purpose in (None, "batch"):
        resp = upload(stack, headers, jsonl({"text": "a"}), purpose=purpose)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "purpose"
    resp = stack.client.post("/v1/files", data={"purpose": "fine-tune"}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "file"
    resp = stack.client.post(
        "/v1/files", content=b"{}", headers={**headers, "content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "file"
    assert stored_objects(stack, tenant) == [] and file_rows(stack, tenant) == 0


def test_unknown_ids_and_bad_pagination_are_clean_4xx(stack: Stack) -> None:
    _, headers, _ = stack.new_tenant()
    assert stack.client.get("/v1/files/file-doesnotexist", headers=headers).status_code == 404
    assert stack.client.get("/v1/files/../../etc/passwd", headers=headers).status_code == 404
    resp = stack.client.get("/v1/files?limit=0", headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "limit"
    resp = stack.client.get("/v1/files?limit=abc", headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_value"
