"""A tenant's running and queued limits hold under concurrent claims and submits (Postgres)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db import session_factory
from shared.errors import RateLimited
from shared.jobs import runs, service
from shared.jobs.schemas import JobCreate
from shared.models import File, Job, RegisteredModel, Tenant

pytestmark = pytest.mark.integration
T = TypeVar("T")
CLAIMERS = 4
ROUNDS = 8


def all_at_once(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run fn(0..n-1) on n threads released together by a barrier."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException] = [RuntimeError("not run")] * n

    def body(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.fixture
def sessions(postgres_url: str) -> sessionmaker[Session]:
    return session_factory(Settings(database_url=postgres_url))


def add_tenant(sessions: sessionmaker[Session], tenant_id: str, **limits: Any) -> None:
    with sessions.begin() as session:
        session.add(Tenant(id=tenant_id, name=tenant_id, **limits))


def add_queued_job(sessions: sessionmaker[Session], job_id: str, tenant_id: str) -> None:
    with sessions.begin() as session:
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant_id,
                model="m",
                training_file="f",
                status="queued",
                spec={},
                hyperparameters={},
                seed=0,
                gpu_class="cpu",
            )
        )


def running(sessions: sessionmaker[Session], tenant_id: str) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.tenant_id == tenant_id, Job.status == "running")
            )
            or 0
        )


def test_four_concurrent_claimers_never_run_two_jobs_for_a_limit_of_one(
    sessions: sessionmaker[Session],
) -> None:
    for r in range(ROUNDS):
        tenant = f"org-limit-{r}"
        add_tenant(sessions, tenant, max_running_jobs=1)
        for i in range(CLAIMERS):
            add_queued_job(sessions, f"ftjob-l{r}-{i}", tenant)

        def claim(i: int, tenant: str = tenant, r: int = r) -> runs.ClaimOutcome:
            with sessions.begin() as session:
                return runs.claim(
                    session, job_id=f"ftjob-l{r}-{i}", owner=f"w{i}", lease_seconds=60
                ).outcome

        outcomes = all_at_once(CLAIMERS, claim)
        assert sorted(map(str, outcomes)) == ["claimed"] + ["waiting_turn"] * (CLAIMERS - 1)
        assert running(sessions, tenant) == 1


def test_concurrent_submits_never_exceed_the_queued_limit(
    sessions: sessionmaker[Session], postgres_url: str
) -> None:
    from worker.training.tiny import DEFAULT_SIZE

    add_tenant(sessions, "org-queued", max_queued_jobs=2)
    with sessions.begin() as session:
        session.add(
            RegisteredModel(
                id="model-q", name="q-llama", source="/nonexistent", config=_config(DEFAULT_SIZE)
            )
        )
        session.add(
            File(
                id="file-q",
                tenant_id="org-queued",
                filename="t.jsonl",
                purpose="fine-tune",
                bytes=10,
                storage_key="files/org-queued/file-q.jsonl",
                format="prompt_completion",
                rows=10,
                sha256="0" * 64,
                stats={},
            )
        )
    body = JobCreate(model="q-llama", training_file="file-q")
    settings = Settings(database_url=postgres_url)

    def submit(_: int) -> str:
        with sessions.begin() as session:
            tenant = session.get(Tenant, "org-queued")
            assert tenant is not None
            job, _row = service.create_job(
                session, tenant=tenant, body=body, idempotency_key=None, settings=settings
            )
            return job.id

    results = all_at_once(6, submit)
    created = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(created) == 2 and len(refused) == 4, results


def _config(size: dict[str, Any]) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": 300, **size}
