"""The worker's job verbs (`shared.jobs.runs`), the lease keeper and the engine hooks: claims,
fenced writes, checkpoints uploaded before they are recorded, retention, deferral."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.prestart import migrate
from shared.db import session_factory
from shared.jobs import outbox, runs
from shared.models import Checkpoint, Job, JobEvent, ObjectDeletion, OutboxMessage, Tenant
from shared.storage import FolderStore
from tests.conftest import SIGNING_SECRET, embedded_settings
from worker.lease_keeper import LeaseKeeper
from worker.runner import JobContext, JobHooks
from worker.training import StepMetrics, StopRequest

Sessions = sessionmaker[Session]


def add_job(sessions: Sessions, job_id: str, tenant: str = "org-a", limit: int = 4) -> None:
    with sessions.begin() as session:
        if session.get(Tenant, tenant) is None:
            session.add(Tenant(id=tenant, name=tenant, max_running_jobs=limit))
            session.flush()
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant,
                model="m",
                training_file="file-x",
                status="queued",
                spec={},
                hyperparameters={},
                seed=0,
                gpu_class="cpu",
            )
        )


@pytest.fixture
def sessions(tmp_path: Path) -> Sessions:
    settings = embedded_settings(tmp_path / "var")
    migrate(settings)
    return session_factory(settings)


def claim(sessions: Sessions, job_id: str, owner: str = "w1") -> runs.Claim:
    with sessions.begin() as session:
        return runs.claim(session, job_id=job_id, owner=owner, lease_seconds=30)


def steal(sessions: Sessions, job_id: str) -> runs.Lease:
    """Another worker takes the job over after the lease expired."""
    # One transaction: a heartbeat between the expiry and the claim would renew the lease.
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=Job.created_at))
        taken = runs.claim(session, job_id=job_id, owner="w2", lease_seconds=60)
    assert taken.lease is not None
    return taken.lease


def test_claim_takes_a_queued_job_once(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1")
    first = claim(sessions, "ftjob-1")
    assert first.outcome is runs.ClaimOutcome.CLAIMED and first.lease is not None
    assert first.lease.attempt == 1
    assert claim(sessions, "ftjob-1", owner="w2").outcome is runs.ClaimOutcome.NOT_CLAIMABLE


def test_a_stale_attempt_can_write_nothing(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1")
    old = claim(sessions, "ftjob-1").lease
    assert old is not None
    new = steal(sessions, "ftjob-1")
    assert new.attempt == 2
    with sessions.begin() as session:
        assert not runs.renew(session, old, lease_seconds=30).held
        assert not runs.record_progress(session, old, progress={"step": 9}, message="x")
        assert not runs.record_run_event(session, old, "stale")
        assert not runs.record_checkpoint(
            session, old, step=9, prefix="checkpoints/x/", metrics={}, keep_last=2
        )
        assert not runs.fail(session, old, code="internal_error", message="x")
        assert not runs.release(session, old, message="x", give_back_attempt=True)
    with sessions() as session:
        job = session.get(Job, "ftjob-1")
        assert job is not None
        assert (job.status, job.step, job.lease_owner, job.attempt) == ("running", 0, "w2", 2)
        assert session.scalars(select(Checkpoint)).all() == []
        assert "stale" not in [e.message for e in session.scalars(select(JobEvent))]
    with sessions.begin() as session:  # the owner's writes go through
        assert runs.renew(session, new, lease_seconds=30).held
        assert runs.record_progress(session, new, progress={"step": 3})


def test_the_same_owner_with_an_older_attempt_is_fenced_too(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1")
    old = claim(sessions, "ftjob-1").lease
    assert old is not None
    with sessions.begin() as session:  # a re-claim by the same process after expiry
        session.execute(update(Job).values(lease_expires_at=Job.created_at))
    again = claim(sessions, "ftjob-1", owner="w1").lease
    assert again is not None and again.owner == old.owner and again.attempt == 2
    with sessions.begin() as session:
        assert not runs.record_progress(session, old, progress={"step": 1})


def test_release_after_transient_faults_counts_the_attempt_and_delays(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1")
    lease = claim(sessions, "ftjob-1").lease
    assert lease is not None
    with sessions.begin() as session:
        assert runs.release(session, lease, message="m", give_back_attempt=False, delay_s=60)
    with sessions() as session:
        job = session.get(Job, "ftjob-1")
        assert job is not None and (job.status, job.attempt, job.max_attempts) == ("queued", 1, 3)
        assert outbox.due(session) == []  # not before its delay
        row = session.scalars(select(OutboxMessage)).one()
        assert row.available_at is not None


def test_release_with_no_attempt_left_fails_instead_of_stranding(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1")
    with sessions.begin() as session:
        session.execute(update(Job).values(max_attempts=1))
    lease = claim(sessions, "ftjob-1").lease
    assert lease is not None
    with sessions.begin() as session:
        assert runs.release(session, lease, message="m", give_back_attempt=False)
    with sessions() as session:
        job = session.get(Job, "ftjob-1")
        assert job is not None and job.status == "failed"
        assert job.error_code == "transient_retries_exhausted"


def test_defer_writes_one_delayed_message_and_one_event(sessions: Sessions) -> None:
    add_job(sessions, "ftjob-1", limit=1)
    add_job(sessions, "ftjob-2", limit=1)
    running = claim(sessions, "ftjob-1").lease
    assert running is not None
    assert claim(sessions, "ftjob-2").outcome is runs.ClaimOutcome.WAITING_TURN
    for _ in range(3):  # every redelivered message defers; only one row and one event result
        with sessions.begin() as session:
            runs.defer(session, job_id="ftjob-2", delay_s=600)
        with sessions.begin() as session:  # the relay sends it when due; then it may defer again
            session.execute(update(OutboxMessage).values(sent_at=OutboxMessage.created_at))
    with sessions() as session:
        waiting = [
            e
            for e in session.scalars(select(JobEvent).where(JobEvent.job_id == "ftjob-2"))
            if (e.data or {}).get("code") == runs.WAITING_CODE
        ]
        assert len(waiting) == 1
    with sessions.begin() as session:  # the running job finishes: the waiting one is offered now
        session.execute(update(OutboxMessage).values(sent_at=None))
        assert outbox.due(session) == []
        assert runs.cancel(session, running, step=1)
    with sessions() as session:
        assert [r.job_id for r in outbox.due(session)] == ["ftjob-2"] * 3
    assert claim(sessions, "ftjob-2").outcome is runs.ClaimOutcome.CLAIMED


def make_hooks(
    sessions: Sessions, tmp_path: Path, keep_last: int = 2
) -> tuple[JobHooks, LeaseKeeper, FolderStore]:
    add_job(sessions, "ftjob-1")
    lease = claim(sessions, "ftjob-1").lease
    assert lease is not None
    settings = embedded_settings(
        tmp_path / "var", progress_interval_seconds=0.0, checkpoint_keep_last=keep_last
    )
    store = FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET)
    keeper = LeaseKeeper(sessions, lease, lease_seconds=30, renew_fraction=0.5)
    return JobHooks(JobContext(settings, sessions, store), lease, keeper), keeper, store


def metrics(step: int, loss: float = 2.0) -> StepMetrics:
    return StepMetrics(step, 10, loss, 1e-4, 0.5, 100.0, 8.0)


def test_progress_is_recorded_with_its_metrics(sessions: Sessions, tmp_path: Path) -> None:
    hooks, _, _ = make_hooks(sessions, tmp_path)
    hooks.on_progress(metrics(1, 2.5))
    hooks.on_eval(1, 2.0, 7.39)
    assert hooks.should_stop() is None
    with sessions() as session:
        job = session.get(Job, "ftjob-1")
        assert job is not None and job.step == 1 and job.loss == 2.5 and job.eval_loss == 2.0
        data = [e.data for e in session.scalars(select(JobEvent).where(JobEvent.type == "metrics"))]
        assert data[0] is not None and data[0]["loss"] == 2.5 and data[0]["grad_norm"] == 0.5
        assert data[1] is not None and data[1]["eval_loss"] == 2.0


def test_a_lost_lease_stops_the_engine_and_its_writes(sessions: Sessions, tmp_path: Path) -> None:
    hooks, keeper, store = make_hooks(sessions, tmp_path)
    steal(sessions, "ftjob-1")
    hooks.on_progress(metrics(2))
    assert not keeper.held and hooks.should_stop() is StopRequest.CANCEL
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    hooks.on_checkpoint(folder, 4)
    assert store.list_keys("checkpoints/") == []  # nothing uploaded once the lease is known lost
    with sessions() as session:
        job = session.get(Job, "ftjob-1")
        assert job is not None and job.step == 0


def test_keeper_notices_a_lost_lease_on_its_own(sessions: Sessions, tmp_path: Path) -> None:
    add_job(sessions, "ftjob-1")
    lease = claim(sessions, "ftjob-1").lease
    assert lease is not None
    keeper = LeaseKeeper(sessions, lease, lease_seconds=0.3, renew_fraction=0.2).start()
    try:
        time.sleep(0.5)
        assert keeper.held  # renewed past its 0.3 s lease without any training hook
        with sessions() as session:
            job = session.get(Job, "ftjob-1")
            assert job is not None and job.lease_expires_at is not None
        steal(sessions, "ftjob-1")
        deadline = time.monotonic() + 10
        while keeper.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not keeper.held
    finally:
        keeper.stop()


def write_checkpoint(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"ckpt-{step}"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(f"weights {step}".encode())
    return folder


def test_checkpoints_go_under_the_attempt_and_only_k_plus_best_remain(
    sessions: Sessions, tmp_path: Path
) -> None:
    hooks, _, store = make_hooks(sessions, tmp_path, keep_last=2)
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5, 10: 2.2}  # step 4 is the best
    for step, loss in losses.items():
        hooks.on_eval(step, loss, 0.0)
        hooks.on_checkpoint(write_checkpoint(tmp_path, step), step)
    with sessions() as session:
        kept = sorted(r.step for r in session.scalars(select(Checkpoint)))
        assert kept == [4, 8, 10]
        assert session.scalars(select(ObjectDeletion)).all() == []  # drained after commit
    prefixes = {k.rsplit("/", 1)[0] for k in store.list_keys("checkpoints/")}
    assert prefixes == {f"checkpoints/org-a/ftjob-1/attempt-1/step-{s}" for s in (4, 8, 10)}


def test_checkpoint_store_failure_is_retried(
    sessions: Sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks, _, store = make_hooks(sessions, tmp_path)
    calls: list[Any] = []
    real = store.sync_dir

    def flaky(prefix: str, folder: Path, **kwargs: Any) -> list[str]:
        calls.append(prefix)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return real(prefix, folder, **kwargs)

    monkeypatch.setattr(store, "sync_dir", flaky)
    hooks.on_checkpoint(write_checkpoint(tmp_path, 2), 2)
    assert len(calls) == 3
    with sessions() as session:
        assert [r.step for r in session.scalars(select(Checkpoint))] == [2]


def test_an_adapter_uploaded_by_a_killed_attempt_is_deleted_when_the_job_ends(
    sessions: Sessions, tmp_path: Path
) -> None:
    from shared.jobs import leases, retention
    from shared.models import Adapter
    from shared.storage import adapter_prefix

    store = FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET)

    def upload(lease: runs.Lease) -> str:
        prefix = adapter_prefix(
            lease.tenant_id, runs.attempt_adapter_id(lease.job_id, lease.attempt)
        )
        store.put_bytes(prefix + "adapter_model.safetensors", b"w" * 10)
        return prefix

    # Succeeds on attempt 2 after attempt 1 died between its upload and its final write.
    add_job(sessions, "ftjob-ok")
    first = claim(sessions, "ftjob-ok").lease
    assert first is not None and runs.attempt_adapter_id("ftjob-ok", 1) == runs.attempt_adapter_id(
        "ftjob-ok", first.attempt
    )
    orphan = upload(first)
    second = steal(sessions, "ftjob-ok")
    kept = upload(second)
    adapter_id = runs.attempt_adapter_id(second.job_id, second.attempt)
    adapter = Adapter(
        id=adapter_id,
        tenant_id=second.tenant_id,
        job_id=second.job_id,
        base_model="m",
        name=f"ft:m:qlora:{adapter_id}",
        storage_prefix=kept,
        metrics={},
        spec={},
    )
    with sessions.begin() as session:
        assert runs.complete(session, second, adapter=adapter)

    # Fails for good after its only attempt died past its upload.
    add_job(sessions, "ftjob-dead")
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == "ftjob-dead").values(max_attempts=1))
    dead = claim(sessions, "ftjob-dead").lease
    assert dead is not None
    dead_upload = upload(dead)
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == "ftjob-dead").values(lease_expires_at=Job.created_at)
        )
        assert leases.sweep_leases(session)[1] == ["ftjob-dead"]

    retention.drain_deletions(sessions, store)
    assert store.list_keys(orphan) == [] and store.list_keys(dead_upload) == []
    assert store.list_keys(kept) == [kept + "adapter_model.safetensors"]
