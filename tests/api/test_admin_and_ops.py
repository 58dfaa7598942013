from __future__ import annotations

import hashlib

from sqlalchemy import select

from shared.models import ApiKey
from tests.conftest import Stack


def test_admin_endpoints_need_the_admin_key(stack: Stack) -> None:
    _, tenant_headers, key_id = stack.new_tenant()
    for headers in ({}, tenant_headers, {"Authorization": "Bearer wrong"}):
        assert (
            stack.client.post("/admin/tenants", json={"name": "x"}, headers=headers).status_code
            == 401
        )
        assert stack.client.get("/admin/models", headers=headers).status_code == 401
        assert stack.client.delete(f"/admin/keys/{key_id}", headers=headers).status_code == 401


def test_keys_are_random_shown_once_and_stored_hashed(stack: Stack) -> None:
    tenant, _, _ = stack.new_tenant()
    issued = [
        stack.client.post(f"/admin/tenants/{tenant}/keys", headers=stack.admin).json()
        for _ in range(3)
    ]
    keys = [k["key"] for k in issued]
    assert len(set(keys)) == 3 and all(len(k) >= 5 + 43 for k in keys)  # 32 bytes, base64url
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        rows = {r.id: r for r in session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant))}
    for k in issued:
        row = rows[k["id"]]
        assert row.key_hash == hashlib.sha256(k["key"].encode()).hexdigest()
        assert row.prefix == k["key"][: len(row.prefix)] and len(row.prefix) < 16
        assert k["key"] not in (row.key_hash, row.prefix)
        assert row.last_used_at is None
    headers = {"Authorization": f"Bearer {keys[0]}"}
    assert stack.client.get("/v1/files", headers=headers).status_code == 200
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        assert session.get(ApiKey, issued[0]["id"]).last_used_at is not None


def test_unknown_tenant_and_key_are_404(stack: Stack) -> None:
    resp = stack.client.post("/admin/tenants/org-nope/keys", headers=stack.admin)
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "tenant_id"
    assert stack.client.delete("/admin/keys/key-nope", headers=stack.admin).status_code == 404


def test_model_registry(stack: Stack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"hidden_size": 64}')
    body = {"name": "tiny-llama", "source": str(tmp_path / "m"), "revision": None}
    resp = stack.client.post("/admin/models", json=body, headers=stack.admin)
    assert resp.status_code == 201
    assert resp.json()["config"] == {"hidden_size": 64, "qlora_chat_template": False}
    (tmp_path / "m" / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    chat = stack.client.post(
        "/admin/models", json={**body, "name": "with-template"}, headers=stack.admin
    )
    assert chat.json()["config"]["qlora_chat_template"] is True
    dup = stack.client.post("/admin/models", json=body, headers=stack.admin)
    assert dup.status_code == 409 and dup.json()["error"]["param"] == "name"
    bad = stack.client.post(
        "/admin/models", json={**body, "name": "../x", "extra": 1}, headers=stack.admin
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_value"
    names = [m["id"] for m in stack.client.get("/admin/models", headers=stack.admin).json()["data"]]
    assert names == ["tiny-llama", "with-template"]


def test_bad_json_bodies_are_4xx(stack: Stack) -> None:
    for content in (b"{", b"[]", b'{"name": ""}', b'{"name": "a", "surprise": true}'):
        resp = stack.client.post(
            "/admin/tenants",
            content=content,
            headers={**stack.admin, "content-type": "application/json"},
        )
        assert resp.status_code == 400, content
        assert set(resp.json()["error"]) >= {"message", "type", "param", "code"}


def test_health_ready_and_metrics(stack: Stack) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert ready.json()["checks"]["object_store"] == "ok"
    _, headers, _ = stack.new_tenant()
    stack.client.post(
        "/v1/files",
        files={"file": ("a.jsonl", b'{"text": "abc"}\n')},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    text = stack.client.get("/metrics").text
    assert 'qlora_http_requests_total{method="POST",route="/v1/files",status="200"}' in text
    assert "qlora_http_request_duration_seconds_bucket" in text
    assert "qlora_upload_bytes_total" in text


def test_readyz_reports_a_broken_store(stack: Stack) -> None:
    store = stack.client.app.state.store  # type: ignore[attr-defined]
    if stack.name == "embedded":
        import shutil

        shutil.rmtree(store.root)
    else:
        store.bucket = "no-such-bucket-here"
    resp = stack.client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["checks"]["object_store"] == "error"
    assert resp.json()["failing"] == ["object_store"]
