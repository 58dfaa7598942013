"""Pause and resume through the API on both stacks: which states pause and resume, idempotence,
the running job's flag, the worker's fenced move to paused, and tenant isolation."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from shared.jobs import runs
from shared.models import Job, OutboxMessage
from tests.api.test_jobs_api import TINY_CONFIG
from tests.conftest import Stack


@pytest.fixture
def job_of(stack: Stack) -> Any:
    """`job_of()`: a new tenant's freshly queued job; returns (headers, job)."""
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny-pause", "source": "org/tiny-pause", "config": TINY_CONFIG},
    )

    def make() -> tuple[dict[str, str], dict[str, Any]]:
        _, headers, _ = stack.new_tenant("pauser")
        row = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
        file_id = stack.client.post(
            "/v1/files",
            headers=headers,
            data={"purpose": "fine-tune"},
            files={"file": ("t.jsonl", row.encode() * 4)},
        ).json()["id"]
        resp = stack.client.post(
            "/v1/fine_tuning/jobs",
            headers=headers,
            json={"model": "tiny-pause", "training_file": file_id},
        )
        assert resp.status_code == 200, resp.text
        return headers, resp.json()

    return make


def act(stack: Stack, headers: dict[str, str], job_id: str, verb: str) -> Any:
    return stack.client.post(f"/v1/fine_tuning/jobs/{job_id}/{verb}", headers=headers)


def status_events(stack: Stack, headers: dict[str, str], job_id: str) -> list[str]:
    page = stack.client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events?limit=100", headers=headers
    ).json()
    return [e["data"]["status"] for e in reversed(page["data"]) if "status" in (e["data"] or {})]


def test_a_queued_job_pauses_at_once_and_resumes_into_the_queue(stack: Stack, job_of: Any) -> None:
    headers, job = job_of()
    paused = act(stack, headers, job["id"], "pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    again = act(stack, headers, job["id"], "pause")  # idempotent: no second transition
    assert again.status_code == 200 and again.json()["status"] == "paused"
    assert status_events(stack, headers, job["id"]) == ["queued", "paused"]

    sessions = stack.client.app.state.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:  # a paused job is not claimable
        claim = runs.claim(session, job_id=job["id"], owner="w", lease_seconds=60)
        assert claim.outcome is runs.ClaimOutcome.NOT_CLAIMABLE

    resumed = act(stack, headers, job["id"], "resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert act(stack, headers, job["id"], "resume").json()["status"] == "queued"  # no-op
    assert status_events(stack, headers, job["id"]) == ["queued", "paused", "queued"]
    with sessions() as session:  # one message per queueing: submit and resume
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job["id"]))
        assert len(rows.all()) == 2


def test_a_running_job_is_flagged_and_a_resume_before_it_pauses_withdraws_it(
    stack: Stack, job_of: Any
) -> None:
    headers, job = job_of()
    sessions = stack.client.app.state.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        claim = runs.claim(session, job_id=job["id"], owner="w", lease_seconds=60)
        assert claim.lease is not None
        lease = claim.lease

    resp = act(stack, headers, job["id"], "pause")
    assert resp.status_code == 200 and resp.json()["status"] == "running"
    with sessions.begin() as session:
        assert runs.renew(session, lease, lease_seconds=60).pause_requested is True
    act(stack, headers, job["id"], "resume")
    with sessions.begin() as session:
        assert runs.renew(session, lease, lease_seconds=60).pause_requested is False

    act(stack, headers, job["id"], "pause")
    with sessions.begin() as session:  # what the worker does once its checkpoint is stored
        assert runs.pause(session, lease, step=7) is True
    with sessions() as session:
        row = session.get(Job, job["id"])
        assert row is not None and row.status == "paused" and row.lease_owner is None
        assert row.pause_requested is False and row.max_attempts == 4  # the attempt given back
    with sessions.begin() as session:  # the paused job's old lease writes nothing more
        assert runs.record_progress(session, lease, progress={"step": 8}) is False


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_finished_or_cancelling_jobs_refuse_pause_and_resume(
    stack: Stack, job_of: Any, verb: str
) -> None:
    headers, job = job_of()
    assert act(stack, headers, job["id"], "cancel").json()["status"] == "cancelled"
    resp = act(stack, headers, job["id"], verb)
    assert resp.status_code == 409, resp.text
    assert (
        resp.json()["error"]["code"]
        == {"pause": "job_not_pausable", "resume": "job_not_resumable"}[verb]
    )
    other_headers, _ = job_of()
    assert act(stack, other_headers, job["id"], verb).status_code == 404  # not theirs


def test_a_paused_job_can_be_cancelled(stack: Stack, job_of: Any) -> None:
    headers, job = job_of()
    act(stack, headers, job["id"], "pause")
    resp = act(stack, headers, job["id"], "cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
