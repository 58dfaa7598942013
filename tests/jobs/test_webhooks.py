"""Webhooks through real processes: the API registers an endpoint, the worker's transitions
write deliveries, the beat relays them and the `webhooks` worker POSTs them, signed, to a real
HTTP receiver on 127.0.0.1 (allowed by `WEBHOOKS_ALLOW_PRIVATE=true`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.jobs.conftest import ServiceStack, StartStack, addition_rows, stop
from tests.webhook_receiver import Received, Receiver, webhook_receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIMINGS = {
    "WEBHOOKS_ALLOW_PRIVATE": "true",
    "WEBHOOKS_RETRY_BASE_SECONDS": "0.5",
    "WEBHOOKS_TIMEOUT_SECONDS": "2",
}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def hooked(start_stack: StartStack) -> Iterator[ServiceStack]:
    """A stack whose every process allows private webhook URLs, with a training worker and
    the webhooks worker."""
    with start_stack(**TIMINGS) as stack:
        deliveries = stack.spawn("webhooks", ["-m", "worker.main", "webhooks"])
        training = stack.start_worker()
        yield stack
        stop(training)
        stop(deliveries)


def verify(secret: str, got: Received) -> dict[str, Any]:
    """The test's own Standard Webhooks check, then the event."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{got.headers['webhook-id']}.{got.headers['webhook-timestamp']}.".encode() + got.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = dict(part.split(",", 1) for part in got.headers["webhook-signature"].split(" "))
    assert hmac.compare_digest(versions["v1"], expected)
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 120
    event: dict[str, Any] = json.loads(got.body)
    return event


def register(
    stack: ServiceStack, headers: dict[str, str], url: str, events: list[str] | None = None
) -> dict[str, Any]:
    with stack.http(headers) as c:
        resp = c.post("/v1/webhooks", json={"url": url, "events": events})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["secret"].startswith("whsec_")
    return body


def deliveries(stack: ServiceStack, headers: dict[str, str], hook_id: str) -> list[dict[str, Any]]:
    with stack.http(headers) as c:
        resp = c.get(f"/v1/webhooks/{hook_id}/deliveries", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def wait_deliveries(
    stack: ServiceStack,
    headers: dict[str, str],
    hook_id: str,
    done: Any,
    timeout: float = 60,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = deliveries(stack, headers, hook_id)
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(json.dumps(rows)[:2000] + "\n" + stack.tail_logs())
        time.sleep(0.3)


def test_a_job_s_running_and_succeeded_each_arrive_once_signed(
    hooked: ServiceStack, receiver: Receiver
) -> None:
    stack = hooked
    headers = stack.new_tenant("hooked")
    hook = register(stack, headers, receiver.url + "/all")
    # The secret is shown once: never again in a read or a list.
    with stack.http(headers) as c:
        assert "secret" not in c.get(f"/v1/webhooks/{hook['id']}").json()
        assert all("secret" not in h for h in c.get("/v1/webhooks").json()["data"])
    file_id = stack.upload(headers, addition_rows(64, seed=3))
    job = stack.submit(headers, file_id, max_steps=4, checkpoint_steps=4)
    done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", json.dumps(done)

    receiver.wait("/all", 2)
    time.sleep(2)  # two more sweeps: nothing is delivered twice
    got = receiver.on("/all")
    events = [verify(hook["secret"], r) for r in got]
    # Both, once each (in either order: deliveries are not ordered, as in Standard Webhooks).
    assert sorted(e["type"] for e in events) == [
        "fine_tuning.job.running",
        "fine_tuning.job.succeeded",
    ]
    for event in events:
        assert event["object"] == "event" and event["id"].startswith("evt_")
        assert event["data"] == {"id": job["id"]} and isinstance(event["created_at"], int)
    assert len({r.headers["webhook-id"] for r in got}) == 2
    # The official SDK verifies the signature and parses OpenAI's event type.
    sdk = OpenAI(api_key="unused", webhook_secret=hook["secret"])
    [succeeded] = [r for r, e in zip(got, events, strict=True) if e["type"].endswith("succeeded")]
    parsed = sdk.webhooks.unwrap(succeeded.body.decode(), succeeded.headers)
    assert parsed.type == "fine_tuning.job.succeeded" and parsed.data.id == job["id"]

    rows = wait_deliveries(
        stack, headers, hook["id"], lambda rows: all(r["status"] == "succeeded" for r in rows)
    )
    assert len(rows) == 2
    for row in rows:
        assert (row["attempts"], row["last_status_code"], row["last_error"]) == (1, 200, None)
        assert row["next_attempt_at"] is None and row["job_id"] == job["id"]
    assert {r["id"] for r in rows} == {r.headers["webhook-id"] for r in got}


def test_a_failing_receiver_is_retried_and_a_cancel_is_announced(
    hooked: ServiceStack, receiver: Receiver
) -> None:
    stack = hooked
    headers = stack.new_tenant("flaky")
    flaky = register(stack, headers, receiver.url + "/flaky", ["fine_tuning.job.cancelled"])
    receiver.script("/flaky", 500, 500, 200)
    file_id = stack.upload(headers, addition_rows(64, seed=4))
    job = stack.submit(headers, file_id, max_steps=400)
    with stack.http(headers) as c:
        assert c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    stack.wait_for(headers, job["id"], lambda j: j["status"] == "cancelled")

    got = receiver.wait("/flaky", 3, timeout=60)
    assert [r.status for r in got] == [500, 500, 200]
    events = [verify(flaky["secret"], r) for r in got]
    assert {e["type"] for e in events} == {"fine_tuning.job.cancelled"}
    assert len({e["id"] for e in events}) == 1  # one event, three attempts
    assert len({r.headers["webhook-id"] for r in got}) == 1  # the same message id each time
    assert got[1].at - got[0].at >= 0.4 and got[2].at - got[1].at >= 0.9  # 0.5 s, then 1 s
    [row] = wait_deliveries(
        stack, headers, flaky["id"], lambda rows: rows and rows[0]["status"] != "pending"
    )
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("succeeded", 3, 200)
    assert row["last_error"] is None and row["event_type"] == "fine_tuning.job.cancelled"
    time.sleep(2)
    assert len(receiver.on("/flaky")) == 3


def test_another_tenant_sees_nothing(hooked: ServiceStack, receiver: Receiver) -> None:
    stack = hooked
    owner = stack.new_tenant("owner")
    hook = register(stack, owner, receiver.url + "/owner")
    other = stack.new_tenant("other")
    with stack.http(other) as c:
        for method, path in (
            ("GET", f"/v1/webhooks/{hook['id']}"),
            ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
            ("DELETE", f"/v1/webhooks/{hook['id']}"),
        ):
            resp = c.request(method, path)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
        assert c.get("/v1/webhooks").json()["data"] == []
    with stack.http(owner) as c:
        assert c.get(f"/v1/webhooks/{hook['id']}").status_code == 200
