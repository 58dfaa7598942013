"""Merge records (`shared.merges`): idempotent creation with an outbox row, fenced worker
writes, the sweeper's recovery of a merge whose worker died, and deletion with the adapter."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.prestart import migrate
from shared import adapters, merges
from shared.broker import MERGE_TASK, RUN_JOB_TASK, JobPublisher
from shared.config import Settings
from shared.db import session_factory
from shared.errors import Conflict, NotFound
from shared.models import Adapter, Job, Merge, ObjectDeletion, OutboxMessage, Tenant, utcnow
from tests.conftest import embedded_settings

Sessions = sessionmaker[Session]
STALE = timedelta(seconds=30)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return embedded_settings(tmp_path / "var", transient_retry_seconds=0.5)


@pytest.fixture
def sessions(settings: Settings) -> Sessions:
    migrate(settings)
    factory = session_factory(settings)
    with factory.begin() as session:
        for tenant in ("org-a", "org-b"):
            session.add(Tenant(id=tenant, name=tenant, max_running_jobs=4))
        session.flush()
        session.add(
            Job(
                id="ftjob-1",
                tenant_id="org-a",
                model="m",
                training_file="file-x",
                status="succeeded",
                spec={},
                hyperparameters={},
                seed=0,
                gpu_class="gpu-24g",
            )
        )
        session.add(
            Adapter(
                id="ftadapter-1",
                tenant_id="org-a",
                job_id="ftjob-1",
                base_model="m",
                name="ft:m:a::1",
                storage_prefix="adapters/org-a/ftadapter-1/",
                metrics={},
                spec={},
            )
        )
    return factory


def create(sessions: Sessions, dtype: str = "bfloat16", tenant: str = "org-a") -> tuple[str, Any]:
    with sessions.begin() as session:
        row, message = merges.create_merge(
            session, tenant_id=tenant, adapter_id="ftadapter-1", dtype=dtype
        )
        return row.id, message and (message.job_id, message.queue)


def claim(sessions: Sessions, merge_id: str) -> merges.MergeClaim | None:
    with sessions.begin() as session:
        return merges.claim(session, merge_id=merge_id, stale_after=STALE)


def age(sessions: Sessions, merge_id: str) -> None:
    """The worker stopped heartbeating longer ago than the timeout."""
    with sessions.begin() as session:
        session.execute(
            update(Merge).where(Merge.id == merge_id).values(updated_at=utcnow() - 2 * STALE)
        )


def test_create_is_idempotent_per_adapter_and_dtype(sessions: Sessions) -> None:
    first, message = create(sessions)
    assert first.startswith("merge-") and message == (first, "gpu-24g")  # the job's queue
    assert create(sessions) == (first, None)  # queued: the same merge, no second message
    other, message = create(sessions, "float16")
    assert other != first and message == (other, "gpu-24g")
    with pytest.raises(NotFound):
        create(sessions, tenant="org-b")
    with sessions.begin() as session:
        row = session.get(Merge, first)
        assert row is not None and row.storage_prefix == f"merged/org-a/{first}/"
        with pytest.raises(NotFound):
            merges.get_merge(session, tenant_id="org-b", merge_id=first)
        with pytest.raises(Conflict):
            merges.archive_key(session, tenant_id="org-a", merge_id=first)
    lease = claim(sessions, first)
    assert lease is not None and claim(sessions, first) is None  # one worker at a time
    with sessions.begin() as session:
        assert merges.fail(session, lease, code="merge_unsupported", detail="DoRA")
    again, message = create(sessions)  # a failed merge does not block a new one
    assert again != first and message is not None


def test_a_merge_whose_worker_died_is_sent_again_then_failed(sessions: Sessions) -> None:
    merge_id, _ = create(sessions)
    dead = claim(sessions, merge_id)
    assert dead is not None and dead.attempt == 1
    with sessions.begin() as session:
        assert merges.recover_stale(session, stale_after=STALE) == {"resent": [], "failed": []}
    age(sessions, merge_id)
    with sessions.begin() as session:
        assert merges.recover_stale(session, stale_after=STALE)["resent"] == [merge_id]
        assert session.get(Merge, merge_id).status == "queued"  # type: ignore[union-attr]
        sent = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == merge_id))
        assert len(list(sent)) == 2  # the first message and the re-send
    alive = claim(sessions, merge_id)
    assert alive is not None and alive.attempt == 2
    with sessions.begin() as session:  # the dead worker's late writes are refused
        assert not merges.heartbeat(session, dead)
        assert not merges.succeed(session, dead, parity={"x": 1})
        assert merges.heartbeat(session, alive)
    for _ in range(merges.MAX_ATTEMPTS - 2):
        age(sessions, merge_id)
        with sessions.begin() as session:
            merges.recover_stale(session, stale_after=STALE)
        assert claim(sessions, merge_id) is not None
    age(sessions, merge_id)
    with sessions.begin() as session:
        assert merges.recover_stale(session, stale_after=STALE)["failed"] == [merge_id]
        row = session.get(Merge, merge_id)
        assert row is not None and row.status == "failed"
        assert row.error_code == "merge_worker_lost" and row.finished_at is not None


def test_deleting_the_adapter_drops_its_merges_and_schedules_their_objects(
    sessions: Sessions,
) -> None:
    first, _ = create(sessions)
    second, _ = create(sessions, "float16")
    with sessions.begin() as session:
        adapters.delete_adapter(session, tenant_id="org-a", adapter_id="ftadapter-1")
    with sessions.begin() as session:
        assert session.scalars(select(Merge)).all() == []
        pending = set(session.scalars(select(ObjectDeletion.prefix)))
        assert {f"merged/org-a/{first}/", f"merged/org-a/{second}/"} <= pending
        assert (
            session.scalars(
                select(OutboxMessage).where(OutboxMessage.job_id.in_([first, second]))
            ).all()
            == []
        )


def test_the_publisher_sends_merge_ids_to_the_merge_task() -> None:
    sent: list[tuple[str, list[str], str]] = []

    class App:
        def send_task(self, name: str, *, args: list[str], queue: str, **_: Any) -> None:
            sent.append((name, args, queue))

    publish = JobPublisher(App())  # type: ignore[arg-type]
    publish("merge-abc", "gpu-24g")
    publish("ftjob-abc", "gpu-24g")
    assert sent == [
        (MERGE_TASK, ["merge-abc"], "gpu-24g"),
        (RUN_JOB_TASK, ["ftjob-abc"], "gpu-24g"),
    ]


def test_a_permanent_fault_fails_the_merge_with_a_tenant_safe_message(
    settings: Settings, sessions: Sessions
) -> None:
    from worker.merge_tasks import run_merge, verdict
    from worker.training.merge import MergeError

    merge_id, _ = create(sessions)  # the adapter's objects are not in the store
    assert run_merge(merge_id, settings=settings) == "failed"
    assert run_merge(merge_id, settings=settings) == "dropped"  # a duplicate message
    with sessions.begin() as session:
        row = session.get(Merge, merge_id)
        assert row is not None and row.status == "failed" and row.finished_at is not None
        # No base model registered under the adapter's base name: checked before the download.
        assert row.error_code == "base_model_unavailable"
        assert row.error_message == merges.public_message("base_model_unavailable")
    secret = "/var/lib/worker/secret/path"
    assert verdict(RuntimeError(secret)) == ("internal_error", "")
    assert verdict(MergeError("DoRA adapters are not supported by the merge yet"))[0] == (
        "merge_unsupported"
    )
    assert verdict(ConnectionError(secret)) == (None, "")  # transient: queued again
    assert secret not in merges.public_message("internal_error")
