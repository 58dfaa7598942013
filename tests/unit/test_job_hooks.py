"""The worker's engine hooks: progress renews the lease, a lost lease or a cancel stops the
engine, checkpoints are uploaded before they are recorded."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update

from api.prestart import migrate
from shared.db import session_factory
from shared.jobs import leases
from shared.jobs.states import JobStatus
from shared.models import Checkpoint, Job, JobEvent, Tenant
from shared.storage import FolderStore
from tests.conftest import SIGNING_SECRET, embedded_settings
from worker.runner import JobHooks
from worker.training import StopRequest


def setup(tmp_path: Path) -> tuple[JobHooks, object, FolderStore]:
    settings = embedded_settings(tmp_path / "var", progress_interval_seconds=0.0)
    migrate(settings)
    sessions = session_factory(settings)
    with sessions.begin() as session:
        session.add(Tenant(id="org-a", name="a"))
        session.flush()
        session.add(
            Job(
                id="ftjob-1",
                tenant_id="org-a",
                model="m",
                training_file="file-x",
                status="queued",
                spec={},
                hyperparameters={},
                seed=0,
                gpu_class="cpu",
            )
        )
    with sessions.begin() as session:
        job = leases.claim_job(session, job_id="ftjob-1", owner="w1", lease_seconds=30)
        assert job is not None
    store = FolderStore(tmp_path / "objects", signing_secret=SIGNING_SECRET)
    hooks = JobHooks(sessions=sessions, store=store, job=job, owner="w1", settings=settings)
    return hooks, sessions, store


def test_progress_renews_the_lease_and_records_metrics(tmp_path: Path) -> None:
    hooks, sessions, _ = setup(tmp_path)
    hooks.on_progress(1, 10, 2.5, 1e-4, 0.9, 100.0, 9.0)
    hooks.on_eval(1, 2.0, 7.39)
    assert hooks.should_stop() is None
    with sessions() as session:  # type: ignore[operator]
        job = session.get(Job, "ftjob-1")
        assert job.step == 1 and job.loss == 2.5 and job.eval_loss == 2.0
        kinds = [
            e.data for e in session.scalars(select(JobEvent).where(JobEvent.type == "metrics"))
        ]
        assert kinds[0]["loss"] == 2.5 and kinds[1]["eval_loss"] == 2.0


def test_cancel_flag_and_lost_lease_stop_the_engine(tmp_path: Path) -> None:
    hooks, sessions, _ = setup(tmp_path)
    with sessions.begin() as session:  # type: ignore[attr-defined]
        session.execute(update(Job).where(Job.id == "ftjob-1").values(cancel_requested=True))
    hooks.on_progress(2, 10, 2.0, 1e-4, 0.5, 100.0, 8.0)
    assert hooks.should_stop() is StopRequest.CANCEL and not hooks.lease_lost

    hooks, sessions, _ = setup(tmp_path / "second")
    with sessions.begin() as session:  # type: ignore[attr-defined]
        session.execute(update(Job).where(Job.id == "ftjob-1").values(lease_owner="w2"))
    hooks.on_progress(2, 10, 2.0, 1e-4, 0.5, 100.0, 8.0)
    assert hooks.lease_lost and hooks.should_stop() is StopRequest.CANCEL
    with sessions.begin() as session:  # type: ignore[attr-defined]
        job = session.get(Job, "ftjob-1")
        # the old owner can no longer finish the job the new owner holds
        assert not leases.finish(session, job, owner="w1", target=JobStatus.SUCCEEDED, message="x")
        assert job.step == 0  # and its progress was not written


def test_checkpoint_is_uploaded_then_recorded_and_a_redone_step_replaces_it(
    tmp_path: Path,
) -> None:
    hooks, sessions, store = setup(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"v1")
    hooks.on_checkpoint(folder, 5)
    (folder / "adapter_model.safetensors").write_bytes(b"v2")
    hooks.on_checkpoint(folder, 5)
    prefix = "checkpoints/org-a/ftjob-1/step-5/"
    assert store.list_keys(prefix) == [
        prefix + "adapter_model.safetensors",
        prefix + "manifest.json",
    ]
    assert store.get_bytes(prefix + "adapter_model.safetensors") == b"v2"
    with sessions() as session:  # type: ignore[operator]
        rows = session.scalars(select(Checkpoint)).all()
        assert [(r.step, r.storage_prefix) for r in rows] == [(5, prefix)]
