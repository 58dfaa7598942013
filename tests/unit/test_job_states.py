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
from shared.jobs import leases, outbox, runs
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


def claim(session: Session, job_id: str, owner: str) -> runs.Lease | None:
    return runs.claim(session, job_id=job_id, owner=owner, lease_seconds=30).lease


def test_claim_is_exclusive_and_respects_the_tenant_limit(session: Session) -> None:
    make_job(session, "ftjob-1")
    make_job(session, "ftjob-2")
    lease = claim(session, "ftjob-1", "w1")
    assert lease is not None and lease.attempt == 1 and lease.owner == "w1"
    job = session.get(Job, "ftjob-1")
    assert job is not None and (job.status, job.lease_owner) == ("running", "w1")
    started = session.scalars(select(JobEvent).where(JobEvent.job_id == "ftjob-1")).all()[-1]
    assert started.data == {"status": "running", "from": "queued", "attempt": 1, "worker": "w1"}
    assert claim(session, "ftjob-1", "w2") is None
    # max_running_jobs=1: the second job waits its turn
    outcome = runs.claim(session, job_id="ftjob-2", owner="w2", lease_seconds=30).outcome
    assert outcome is runs.ClaimOutcome.WAITING_TURN
    other = runs.Lease("ftjob-1", "org-a", "w2", 1)
    assert runs.renew(session, other, lease_seconds=30).held is False  # only the owner renews
    assert runs.renew(session, lease, lease_seconds=30).held is True


def expire(session: Session, job_id: str) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()


def test_sweeper_requeues_expired_leases_then_fails_after_max_attempts(session: Session) -> None:
    make_job(session, "ftjob-1", max_attempts=2)
    for attempt in (1, 2):
        lease = claim(session, "ftjob-1", f"w{attempt}")
        assert lease is not None and lease.attempt == attempt
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
    assert claim(session, "ftjob-1", "w3") is None
    messages = session.scalars(select(OutboxMessage)).all()
    assert len(messages) == 1  # one republish, for the single requeue


def test_cancel_requested_job_with_a_dead_worker_ends_cancelled(session: Session) -> None:
    make_job(session, "ftjob-1")
    assert claim(session, "ftjob-1", "w1")
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

    rows = outbox.due(session)
    assert [r.job_id for r in rows] == ["ftjob-0", "ftjob-1", "ftjob-2"]
    outbox.publish(session, rows, flaky)
    session.commit()
    assert sent == ["ftjob-0"]
    assert [r.job_id for r in outbox.due(session)] == ["ftjob-1", "ftjob-2"]


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


def test_a_requeue_by_the_sweeper_is_due_at_once_an_api_submit_after_the_grace(
    session: Session,
) -> None:
    api_job = make_job(session, "ftjob-api")
    swept = make_job(session, "ftjob-swept")
    outbox.enqueue(session, api_job, caller_sends=True)
    outbox.enqueue(session, swept)
    session.commit()
    assert [row.job_id for row in outbox.due(session)] == ["ftjob-swept"]
    later = utcnow() + outbox.GRACE + timedelta(seconds=1)
    assert [row.job_id for row in outbox.due(session, now=later)] == ["ftjob-api", "ftjob-swept"]


def test_a_queued_job_is_republished_early_only_while_a_worker_for_its_queue_idles(
    session: Session,
) -> None:
    make_job(session, "ftjob-lost")
    sent = utcnow() - leases.IDLE_REPUBLISH_AFTER - timedelta(seconds=5)
    session.add(OutboxMessage(job_id="ftjob-lost", queue="cpu", sent_at=sent, created_at=sent))
    session.execute(update(Job).where(Job.id == "ftjob-lost").values(updated_at=sent))
    session.commit()
    assert leases.republish_stale_queued(session) == []  # nobody idles: wait the long cutoff
    assert leases.republish_stale_queued(session, idle_queues={"gpu-24g"}) == []
    assert leases.republish_stale_queued(session, idle_queues={"cpu"}) == ["ftjob-lost"]
    session.commit()
    # Its new message is pending now, so the next sweep does not add another.
    assert leases.republish_stale_queued(session, idle_queues={"cpu"}) == []
    rows = session.scalars(select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))).all()
    assert [r.job_id for r in rows] == ["ftjob-lost"]
