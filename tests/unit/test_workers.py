"""The worker fleet (`shared.workers`) on SQLite and Postgres: capacity and queues, the
heartbeat table, admission, the one no-live-worker event per queueing, and the queue gauges."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.prestart import migrate
from shared import workers
from shared.config import Settings
from shared.db import _engine_for, get_engine
from shared.estimate import GIB
from shared.jobs.states import JobStatus, set_status
from shared.models import Job, JobEvent, Tenant, Worker, utcnow
from tests import services
from tests.conftest import embedded_settings

STALE = 45.0


def settings_for(var_dir: Path, **overrides: object) -> Settings:
    return embedded_settings(var_dir, worker_stale_seconds=STALE, **overrides)


@pytest.fixture(scope="module")
def own_postgres_url() -> Iterator[str]:
    """A database of this module's own: the sweeper's queries read every queued job and live
    worker, so jobs other tests left in the session's database would show up here."""
    services.require("Postgres", services.postgres_available())
    with services.temporary_postgres_database() as url:
        migrate(Settings(database_url=url, var_dir=Path("/nonexistent")))
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Session]:
    """A session on a migrated database; everything it did is rolled back afterwards."""
    if request.param == "sqlite":
        settings = settings_for(tmp_path / "var")
        migrate(settings)
    else:
        settings = settings_for(
            tmp_path / "var", database_url=request.getfixturevalue("own_postgres_url")
        )
    connection = get_engine(settings).connect()
    transaction = connection.begin()
    db = Session(bind=connection)
    try:
        yield db
    finally:
        db.close()
        transaction.rollback()
        connection.close()
        if request.param == "sqlite":
            _engine_for(settings.database_url).dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path / "var")


def announce(session: Session, worker_id: str, queues: list[str]) -> Worker:
    return workers.register(
        session, worker_id=worker_id, hostname="box", queues=queues, device="cpu", memory_bytes=GIB
    )


def age_worker(session: Session, worker_id: str, seconds: float) -> None:
    session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
    )


def queued_job(session: Session, job_id: str, queue: str) -> Job:
    if session.get(Tenant, "org-a") is None:
        session.add(Tenant(id="org-a", name="a"))
        session.flush()
    job = Job(
        id=job_id,
        tenant_id="org-a",
        model="m",
        training_file="file-x",
        spec={},
        hyperparameters={},
        seed=0,
        gpu_class=queue,
        estimate={"total_bytes": 1},
    )
    session.add(job)
    session.flush()
    assert set_status(session, job, JobStatus.QUEUED, message=f"queued on {queue}")
    return job


def requeue(session: Session, job: Job) -> None:
    assert set_status(session, job, JobStatus.RUNNING, message="claimed", attempt=job.attempt + 1)
    assert set_status(session, job, JobStatus.QUEUED, message="lease expired")


def no_worker_events(session: Session, job_id: str) -> list[JobEvent]:
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq))
    return [e for e in rows if (e.data or {}).get("code") == workers.NO_LIVE_WORKER]


# --- capacity and queues ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        (int(23.5 * GIB), ["cpu", "gpu-24g"]),  # a 24 GiB box: MemTotal is a little short
        (int(23.6 * GIB), ["cpu", "gpu-24g"]),  # a "24 GB" card as torch reports it
        (16 * GIB, ["cpu"]),
        (int(79.1 * GIB), ["cpu", "gpu-24g", "gpu-48g", "gpu-80g"]),  # an 80 GB card
        (48 * GIB, ["cpu", "gpu-24g", "gpu-48g"]),
    ],
)
def test_auto_consumes_cpu_and_every_class_the_memory_holds(
    tmp_path: Path, memory: int, expected: list[str]
) -> None:
    settings = settings_for(tmp_path, worker_queues="auto")
    assert workers.resolve_queues(settings, "cpu", memory) == expected


def test_explicit_queues_are_kept_as_given_and_auto_can_join_them(tmp_path: Path) -> None:
    explicit = settings_for(tmp_path, worker_queues="gpu-80g, cpu")
    assert workers.resolve_queues(explicit, "cpu", GIB) == ["gpu-80g", "cpu"]
    mixed = settings_for(tmp_path, worker_queues="gpu-80g,auto")
    assert workers.resolve_queues(mixed, "cpu", 24 * GIB) == ["gpu-80g", "cpu", "gpu-24g"]


def test_capacity_is_ram_on_a_cpu_box_unless_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers, "_cuda_capacity", lambda: None)  # the CPU path, GPU or not
    assert workers.detect_capacity(settings_for(tmp_path)) == ("cpu", workers.total_ram_bytes())
    declared = settings_for(tmp_path, worker_memory_bytes=24 * GIB)
    assert workers.detect_capacity(declared) == ("cpu", 24 * GIB)
    assert workers.total_ram_bytes() > GIB
    assert 0 < workers.available_ram_bytes() <= workers.total_ram_bytes()


# --- the fleet table -------------------------------------------------------------------------


def test_a_worker_is_live_until_it_stops_heartbeating(session: Session, settings: Settings) -> None:
    announce(session, "box:1", ["cpu", "gpu-24g"])
    announce(session, "box:2", ["cpu"])
    assert [w.id for w in workers.live_workers(session, settings, "gpu-24g")] == ["box:1"]
    assert {w.id for w in workers.live_workers(session, settings)} == {"box:1", "box:2"}
    age_worker(session, "box:1", STALE + 5)
    assert workers.live_workers(session, settings, "gpu-24g") == []
    assert workers.heartbeat(session, worker_id="box:1", current_job_id="ftjob-1")
    [back] = workers.live_workers(session, settings, "gpu-24g")
    assert back.id == "box:1"
    session.refresh(back)
    assert back.current_job_id == "ftjob-1"


def test_heartbeat_of_an_unknown_worker_says_so(session: Session) -> None:
    assert not workers.heartbeat(session, worker_id="box:9", current_job_id=None)
    announce(session, "box:9", ["cpu"])
    assert workers.heartbeat(session, worker_id="box:9", current_job_id=None)
    assert workers.unregister(session, worker_id="box:9")
    assert session.get(Worker, "box:9") is None


def test_stale_workers_are_listed_a_while_then_pruned(session: Session, settings: Settings) -> None:
    announce(session, "box:1", ["cpu"])
    announce(session, "box:2", ["cpu"])
    age_worker(session, "box:1", STALE + 5)
    age_worker(session, "box:2", STALE * workers.PRUNE_AFTER_STALE_FACTOR + 5)
    assert workers.prune_stale(session, settings) == 1
    session.expire_all()
    [left] = workers.list_workers(session)
    assert left.id == "box:1" and not workers.is_live(left, settings)


def test_admission_names_what_to_start_when_nobody_serves_the_queue(
    session: Session, settings: Settings
) -> None:
    unserved = workers.admission(session, settings, "gpu-24g")
    assert unserved["queue"] == "gpu-24g" and unserved["live_workers"] == 0
    assert "WORKER_QUEUES=gpu-24g" in unserved["note"] and "24 GiB" in unserved["note"]
    announce(session, "box:1", ["cpu", "gpu-24g"])
    assert workers.admission(session, settings, "gpu-24g") == {
        "queue": "gpu-24g",
        "live_workers": 1,
    }


# --- unserved jobs ---------------------------------------------------------------------------


def test_an_unserved_job_gets_one_event_per_queueing(session: Session, settings: Settings) -> None:
    announce(session, "box:1", ["cpu"])
    job = queued_job(session, "ftjob-big", "gpu-24g")
    served = queued_job(session, "ftjob-small", "cpu")
    assert workers.flag_unserved_jobs(session, settings) == ["ftjob-big"]
    assert workers.flag_unserved_jobs(session, settings) == []
    [event] = no_worker_events(session, job.id)
    assert event.level == "warn" and event.data == {"code": "no_live_worker", "queue": "gpu-24g"}
    assert "WORKER_QUEUES=gpu-24g" in event.message
    assert no_worker_events(session, served.id) == []
    requeue(session, job)  # queued again: it deserves a new event
    assert workers.flag_unserved_jobs(session, settings) == ["ftjob-big"]
    assert workers.flag_unserved_jobs(session, settings) == []
    assert len(no_worker_events(session, job.id)) == 2


def test_a_job_is_not_flagged_while_a_live_worker_serves_it(
    session: Session, settings: Settings
) -> None:
    announce(session, "box:1", ["gpu-24g"])
    job = queued_job(session, "ftjob-1", "gpu-24g")
    assert workers.flag_unserved_jobs(session, settings) == []
    running = queued_job(session, "ftjob-2", "gpu-24g")
    assert set_status(session, running, JobStatus.RUNNING, message="claimed")
    age_worker(session, "box:1", STALE + 5)  # its only worker went quiet
    assert workers.flag_unserved_jobs(session, settings) == [job.id]  # not the running one


def test_note_admission_stores_it_and_the_sweeper_does_not_repeat_the_event(
    session: Session, settings: Settings
) -> None:
    job = queued_job(session, "ftjob-1", "gpu-48g")
    answer = workers.note_admission(session, settings, job)
    session.expire_all()
    stored = session.get(Job, job.id)
    assert stored is not None and stored.estimate == {"total_bytes": 1, "admission": answer}
    assert answer["live_workers"] == 0 and "48 GiB" in answer["note"]
    assert len(no_worker_events(session, job.id)) == 1
    assert workers.flag_unserved_jobs(session, settings) == []
    served = queued_job(session, "ftjob-2", "cpu")
    announce(session, "box:1", ["cpu"])
    assert workers.note_admission(session, settings, served)["live_workers"] == 1
    assert no_worker_events(session, served.id) == []


# --- queue gauges ----------------------------------------------------------------------------


def test_queue_stats_count_depth_age_since_last_queued_and_live_workers(
    session: Session, settings: Settings
) -> None:
    announce(session, "box:1", ["cpu", "gpu-24g"])
    announce(session, "box:2", ["cpu"])
    old = queued_job(session, "ftjob-old", "gpu-48g")
    queued_job(session, "ftjob-new", "gpu-48g")
    session.execute(
        update(JobEvent)
        .where(JobEvent.job_id == old.id)
        .values(created_at=utcnow() - timedelta(hours=2))
    )
    requeued = queued_job(session, "ftjob-requeued", "cpu")
    session.execute(
        update(JobEvent)
        .where(JobEvent.job_id == requeued.id)
        .values(created_at=utcnow() - timedelta(hours=5))
    )
    requeue(session, requeued)  # waiting since now, not since it was first queued
    stats = {row.queue: row for row in workers.queue_stats(session, settings)}
    assert list(stats) == ["cpu", "gpu-24g", "gpu-48g", "gpu-80g"]
    assert stats["gpu-48g"].depth == 2 and stats["gpu-48g"].live_workers == 0
    assert 2 * 3600 - 60 < stats["gpu-48g"].oldest_queued_seconds < 3 * 3600
    assert stats["cpu"].depth == 1 and stats["cpu"].live_workers == 2
    assert stats["cpu"].oldest_queued_seconds < 3600
    assert stats["gpu-24g"].depth == 0 and stats["gpu-24g"].oldest_queued_seconds == 0
    assert stats["gpu-24g"].live_workers == 1 and stats["gpu-80g"].live_workers == 0
