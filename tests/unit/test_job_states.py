"""The state machine, claims and the sweeper against a migrated SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.prestart import migrate
from shared.db import session_factory
from shared.jobs import leases
from shared.jobs.states import TRANSITIONS, IllegalTransition, JobStatus, set_status
from shared.models import IdempotencyKey, Job, JobEvent, OutboxMessage, Tenant, utcnow
from tests.conftest import embedded_settings


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    settings = embedded_settings(tmp_path)
    migrate(settings)
    with session_factory(settings)() as s:
        s.add(Tenant(id="org-a", name="a", max_running_jobs=1))
        s.commit()
        yield s


def make_job(session: Session, job_id: str, status: str = "queued", **fields: object) -> Job:
    job = Job(
        id=job_id,
        tenant_id="org-a",
        model="m",
        training_file="file-x",
        status=status,
        spec={},
        hyperparameters={},
        seed=0,
        gpu_class="cpu",
        **fields,
    )
    session.add(job)
    session.commit()
    return job


def test_final_states_have_no_way_out_and_illegal_moves_raise(session: Session) -> None:
    for final in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        assert TRANSITIONS[final] == frozenset()
    job = make_job(session, "ftjob-1", status="succeeded")
    with pytest.raises(IllegalTransition):
        set_status(session, job, JobStatus.RUNNING, message="no")
    queued = make_job(session, "ftjob-2")
    with pytest.raises(IllegalTransition):
        set_status(session, queued, JobStatus.SUCCEEDED, message="skipping running")
    assert session.get(Job, "ftjob-2").status == "queued"  # type: ignore[union-attr]


def test_set_status_is_conditional_so_a_race_has_one_winner(session: Session) -> None:
    job = make_job(session, "ftjob-1")
    session.execute(update(Job).where(Job.id == job.id).values(status="cancelled"))
    assert (
        set_status(session, job, JobStatus.RUNNING, message="late", expect=JobStatus.QUEUED)
        is False
    )
    assert session.get(Job, job.id).status == "cancelled"  # type: ignore[union-attr]
    assert session.scalars(select(JobEvent)).all() == []


def test_claim_is_exclusive_and_respects_the_tenant_limit(session: Session) -> None:
    make_job(session, "ftjob-1")
    make_job(session, "ftjob-2")
    job = leases.claim_job(session, job_id="ftjob-1", owner="w1", lease_seconds=30)
    assert job is not None and job.attempt == 1 and job.lease_owner == "w1"
    assert leases.claim_job(session, job_id="ftjob-1", owner="w2", lease_seconds=30) is None
    # max_running_jobs=1: the second job waits its turn
    assert leases.claim_job(session, job_id="ftjob-2", owner="w2", lease_seconds=30) is None
    assert leases.is_waiting_turn(session, job_id="ftjob-2")
    state = leases.renew_lease(session, job_id="ftjob-1", owner="w2", lease_seconds=30, progress={})
    assert state.held is False  # only the owner renews
    state = leases.renew_lease(
        session, job_id="ftjob-1", owner="w1", lease_seconds=30, progress={"step": 3}
    )
    session.expire_all()
    assert state.held is True and session.get(Job, "ftjob-1").step == 3  # type: ignore[union-attr]


def expire(session: Session, job_id: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


def test_sweeper_requeues_expired_leases_then_fails_after_max_attempts(session: Session) -> None:
    make_job(session, "ftjob-1", max_attempts=2)
    for attempt in (1, 2):
        job = leases.claim_job(session, job_id="ftjob-1", owner=f"w{attempt}", lease_seconds=30)
        assert job is not None and job.attempt == attempt
        session.commit()
        expire(session, "ftjob-1")
        requeued, failed, _ = leases.sweep_leases(session)
        session.commit()
        session.expire_all()
        if attempt == 1:
            assert requeued == ["ftjob-1"] and failed == []
            assert session.get(Job, "ftjob-1").status == "queued"  # type: ignore[union-attr]
        else:
            assert requeued == [] and failed == ["ftjob-1"]
    job = session.get(Job, "ftjob-1")
    assert job is not None and job.status == "failed" and job.error_code == "max_attempts_exceeded"
    assert leases.claim_job(session, job_id="ftjob-1", owner="w3", lease_seconds=30) is None
    outbox = session.scalars(select(OutboxMessage)).all()
    assert len(outbox) == 1  # one republish, for the single requeue


def test_cancel_requested_job_with_a_dead_worker_ends_cancelled(session: Session) -> None:
    make_job(session, "ftjob-1")
    assert leases.claim_job(session, job_id="ftjob-1", owner="w1", lease_seconds=30)
    session.execute(update(Job).where(Job.id == "ftjob-1").values(cancel_requested=True))
    expire(session, "ftjob-1")
    _, _, cancelled = leases.sweep_leases(session)
    session.expire_all()
    assert cancelled == ["ftjob-1"]
    assert session.get(Job, "ftjob-1").status == "cancelled"  # type: ignore[union-attr]


def test_outbox_relay_marks_sent_and_stops_at_the_first_broker_error(session: Session) -> None:
    old = utcnow() - timedelta(minutes=1)
    for i in range(3):
        session.add(OutboxMessage(job_id=f"ftjob-{i}", queue="cpu", created_at=old))
    session.add(OutboxMessage(job_id="ftjob-fresh", queue="cpu"))  # left to its publisher
    session.commit()
    sent: list[str] = []

    def flaky(job_id: str, queue: str) -> None:
        if job_id == "ftjob-1":
            raise ConnectionError("broker down")
        sent.append(job_id)

    rows = leases.unsent_outbox(session)
    assert [r.job_id for r in rows] == ["ftjob-0", "ftjob-1", "ftjob-2"]
    leases.publish_outbox(session, rows, flaky)
    session.commit()
    assert sent == ["ftjob-0"]
    assert [r.job_id for r in leases.unsent_outbox(session)] == ["ftjob-1", "ftjob-2"]


def test_expired_idempotency_keys_are_deleted(session: Session) -> None:
    now = utcnow()
    session.add(
        IdempotencyKey(
            tenant_id="org-a", key="old", request_hash="h", expires_at=now - timedelta(seconds=1)
        )
    )
    session.add(
        IdempotencyKey(
            tenant_id="org-a", key="new", request_hash="h", expires_at=now + timedelta(hours=24)
        )
    )
    session.commit()
    assert leases.expire_idempotency_keys(session) == 1
    assert [k.key for k in session.scalars(select(IdempotencyKey))] == ["new"]
