"""`/v1/webhooks` on the API (embedded and services): registration rules as 400s naming the
field, the secret shown once, pagination, deletion, and tenant isolation (404)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from shared.models import WebhookEndpoint
from shared.webhooks import EVENT_TYPES
from tests.conftest import Stack


def allow_private(stack: Stack, allowed: bool) -> None:
    app: Any = stack.client.app
    app.state.settings = app.state.settings.model_copy(update={"webhooks_allow_private": allowed})


def error(resp: Any, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()["error"]
    assert body["type"] == "invalid_request_error"
    return body


def test_registration_refuses_bad_input_with_a_code_and_the_field(stack: Stack) -> None:
    _, headers, _ = stack.new_tenant()

    def post(**body: Any) -> Any:
        return stack.client.post("/v1/webhooks", json=body, headers=headers)

    cases = [
        ({"url": "ftp://example.com/hook"}, "invalid_url_scheme", "url"),
        ({"url": "http://127.0.0.1:8080/hook"}, "private_address", "url"),
        ({"url": "http://localhost/hook"}, "private_address", "url"),
        ({"url": "http://[::1]/hook"}, "private_address", "url"),
        ({"url": "http://10.1.2.3/hook"}, "private_address", "url"),
        ({"url": "http://169.254.169.254/latest"}, "private_address", "url"),
        ({"url": "http://user:pw@93.184.216.34/"}, "invalid_url", "url"),
        ({"url": "https://93.184.216.34/" + "a" * 2100}, "url_too_long", "url"),
        ({"url": "https://93.184.216.34/", "events": ["fine_tuning.job.done"]}, None, "events"),
        ({"url": "https://93.184.216.34/", "events": []}, "invalid_value", "events"),
        ({"url": "https://93.184.216.34/", "secret": "mine"}, None, "secret"),
        ({}, None, "url"),
    ]
    for body, code, param in cases:
        got = error(post(**body))
        assert got["param"] == param, (body, got)
        if code is not None:
            assert got["code"] == code, (body, got)
    assert error(post(url="https://93.184.216.34/", events=["x"]))["code"] == "unknown_event_type"
    assert "127.0.0.1" not in error(post(url="http://localhost/"))["message"]
    assert stack.client.get("/v1/webhooks", headers=headers).json()["data"] == []


def test_endpoints_secret_once_pagination_limit_and_delete(stack: Stack) -> None:
    allow_private(stack, True)
    _, headers, _ = stack.new_tenant()
    created = []
    for n in range(10):
        resp = stack.client.post(
            "/v1/webhooks",
            json={"url": f"http://127.0.0.1:9/hook/{n}", "description": f"n{n}"},
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        created.append(resp.json())
    first = created[0]
    assert first["object"] == "webhook_endpoint" and first["id"].startswith("wh-")
    assert first["events"] == list(EVENT_TYPES) and first["disabled"] is False
    assert first["secret"].startswith("whsec_")
    assert len({c["secret"] for c in created}) == 10
    # The limit: an eleventh is refused until one is deleted.
    too_many = error(
        stack.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x"}, headers=headers)
    )
    assert too_many["code"] == "too_many_webhooks"
    # Reads never show the secret again.
    got = stack.client.get(f"/v1/webhooks/{first['id']}", headers=headers).json()
    assert "secret" not in got and got == {k: v for k, v in first.items() if k != "secret"}
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4}
    while True:
        page = stack.client.get("/v1/webhooks", params=params, headers=headers).json()
        assert all("secret" not in h for h in page["data"])
        seen += [h["id"] for h in page["data"]]
        if not page["has_more"]:
            break
        params["after"] = page["data"][-1]["id"]
    assert seen == [c["id"] for c in reversed(created)]
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        stored = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == first["id"]))
        assert stored is not None and stored.secret == first["secret"]

    deleted = stack.client.delete(f"/v1/webhooks/{first['id']}", headers=headers)
    assert deleted.json() == {
        "id": first["id"],
        "object": "webhook_endpoint.deleted",
        "deleted": True,
    }
    assert stack.client.get(f"/v1/webhooks/{first['id']}", headers=headers).status_code == 404
    assert stack.client.delete(f"/v1/webhooks/{first['id']}", headers=headers).status_code == 404
    resp = stack.client.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/x", "events": ["fine_tuning.job.failed"]},
        headers=headers,
    )
    assert resp.status_code == 200 and resp.json()["events"] == ["fine_tuning.job.failed"]
    deliveries = stack.client.get(f"/v1/webhooks/{resp.json()['id']}/deliveries", headers=headers)
    assert deliveries.json() == {"object": "list", "data": [], "has_more": False}
    # The setting off again: the same private URL is refused at registration.
    allow_private(stack, False)
    refused = error(
        stack.client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/y"}, headers=headers)
    )
    assert (refused["code"], refused["param"]) == ("private_address", "url")


def test_another_tenant_gets_404_everywhere(stack: Stack) -> None:
    allow_private(stack, True)
    _, owner, _ = stack.new_tenant("owner")
    _, other, _ = stack.new_tenant("other")
    hook = stack.client.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/o"}, headers=owner
    ).json()
    for method, path in (
        ("GET", f"/v1/webhooks/{hook['id']}"),
        ("DELETE", f"/v1/webhooks/{hook['id']}"),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
        ("GET", "/v1/webhooks/wh-nope"),
    ):
        got = error(stack.client.request(method, path, headers=other), 404)
        assert got["code"] == "not_found"
    assert error(stack.client.get("/v1/webhooks", params={"after": hook["id"]}, headers=other), 404)
    assert stack.client.get("/v1/webhooks", headers=other).json()["data"] == []
    assert stack.client.get(f"/v1/webhooks/{hook['id']}", headers=owner).status_code == 200
    assert stack.client.get("/v1/webhooks", headers={}).status_code == 401
