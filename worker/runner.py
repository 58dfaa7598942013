"""Run one job on this worker: claim, fetch inputs, train with hooks, store, transition.

The glue between the engine (`worker.training`, no I/O of its own), the database (`shared.jobs`)
and the object store. The Celery task is a one-line call into `run_job`.
"""

from __future__ import annotations

import gc
import io
import logging
import math
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.adapters import ARCHIVE_NAME
from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.events import configure_publisher, record_event
from shared.ids import new_id
from shared.jobs import leases
from shared.jobs.states import JobStatus
from shared.models import Adapter, Checkpoint, File, Job, RegisteredModel
from shared.storage import ObjectStore, adapter_prefix, checkpoint_prefix, make_store
from shared.train_spec import TrainSpec
from worker.celery_app import publish_job, worker_identity
from worker.training.checkpoint import CheckpointError
from worker.training.hooks import StopRequest, TrainHooks

log = logging.getLogger("worker.runner")


def shutdown_requested() -> bool:
    """True once Celery's worker got SIGTERM/SIGINT (warm shutdown) in this process."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class JobHooks(TrainHooks):
    """Engine hooks that turn progress into lease renewals, events and checkpoints."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        store: ObjectStore,
        job: Job,
        owner: str,
        settings: Settings,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.job_id = job.id
        self.tenant_id = job.tenant_id
        self.owner = owner
        self.settings = settings
        self.last_write = 0.0
        self.lease_lost = False
        self.cancel_requested = False
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.checkpoints = 0

    def _job(self, session: Session) -> Job:
        job = session.get(Job, self.job_id)
        assert job is not None
        return job

    def _renew(self, session: Session, progress: dict[str, Any]) -> None:
        state = leases.renew_lease(
            session,
            job_id=self.job_id,
            owner=self.owner,
            lease_seconds=self.settings.lease_seconds,
            progress=progress,
        )
        self.lease_lost = not state.held
        self.cancel_requested = state.cancel_requested
        self.last_write = time.monotonic()

    def on_progress(
        self,
        step: int,
        total_steps: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        eta_s: float,
    ) -> None:
        self.last_loss = _finite(loss)
        due = time.monotonic() - self.last_write >= self.settings.progress_interval_seconds
        if not (step == 1 or step == total_steps or due):
            return
        progress = {
            "step": step,
            "total_steps": total_steps,
            "loss": _finite(loss),
            "tokens_per_second": _finite(tokens_per_s),
            "eta_seconds": _finite(eta_s),
        }
        with self.sessions.begin() as session:
            self._renew(session, progress)
            if not self.lease_lost:
                record_event(
                    session,
                    self._job(session),
                    f"Step {step}/{total_steps}: training loss={loss:.4f}",
                    type="metrics",
                    data={
                        "step": step,
                        "total_steps": total_steps,
                        "loss": _finite(loss),
                        "lr": lr,
                        "grad_norm": _finite(grad_norm),
                        "tokens_per_second": _finite(tokens_per_s),
                        "eta_seconds": _finite(eta_s),
                    },
                )

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        self.last_eval = _finite(eval_loss)
        with self.sessions.begin() as session:
            self._renew(session, {"eval_loss": _finite(eval_loss)})
            if not self.lease_lost:
                record_event(
                    session,
                    self._job(session),
                    f"Step {step}: validation loss={eval_loss:.4f} (perplexity {perplexity:.2f})",
                    type="metrics",
                    data={
                        "step": step,
                        "eval_loss": _finite(eval_loss),
                        "perplexity": _finite(perplexity),
                    },
                )

    def on_checkpoint(self, path: Path, step: int) -> None:
        prefix = checkpoint_prefix(self.tenant_id, self.job_id, step)
        self.store.delete_prefix(prefix)  # a redone step replaces its older upload
        self.store.upload_dir(prefix, path)
        with self.sessions.begin() as session:
            self._renew(session, {})
            if self.lease_lost:
                return
            old = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
            )
            if old is not None:
                session.delete(old)
                session.flush()
            session.add(
                Checkpoint(
                    id=new_id("checkpoint"),
                    job_id=self.job_id,
                    tenant_id=self.tenant_id,
                    step=step,
                    metrics={
                        "step": step,
                        "train_loss": self.last_loss,
                        "valid_loss": self.last_eval,
                    },
                    storage_prefix=prefix,
                )
            )
            record_event(
                session,
                self._job(session),
                f"Checkpoint saved at step {step}",
                data={"checkpoint_step": step},
            )
        self.checkpoints += 1

    def should_stop(self) -> StopRequest | None:
        if self.lease_lost or self.cancel_requested:
            return StopRequest.CANCEL
        if shutdown_requested():
            return StopRequest.PREEMPT
        return None


def resolve_base_model(model: RegisteredModel) -> Path:
    """The base model's local folder. Hub ids are fetched (safetensors only) into HF_HOME."""
    path = Path(model.source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=model.source,
            revision=model.revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    )


def _fetch_checkpoint(store: ObjectStore, session: Session, job: Job, into: Path) -> Path | None:
    """Download the newest checkpoint; older ones are fallbacks if it is incomplete."""
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step.desc())
    ).all()
    for row in rows:
        target = into / f"step-{row.step}"
        if store.download_prefix(row.storage_prefix, target):
            return target
    return None


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    # Level 1: LoRA weights barely compress, so higher levels only cost CPU time.
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=f"adapter/{path.name}")
    return buf.getvalue()


def run_job(job_id: str, *, settings: Settings | None = None) -> str:
    settings = settings or get_settings()
    configure_publisher(settings.redis_url)
    sessions = session_factory(settings)
    store = make_store(settings)
    owner = worker_identity()
    with sessions.begin() as session:
        job = leases.claim_job(
            session, job_id=job_id, owner=owner, lease_seconds=settings.lease_seconds
        )
        waiting = job is None and leases.is_waiting_turn(session, job_id=job_id)
    if job is None:
        if waiting:  # held back by the tenant's running-jobs limit: knock again later
            publish_job(job_id, _queue_of(sessions, job_id), countdown=15)
            return "deferred"
        return "dropped"
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-{job_id}-"))
    try:
        return _train_claimed(
            job, sessions=sessions, store=store, owner=owner, settings=settings, workdir=workdir
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()  # after the result is recorded: the job does not wait for it


def _queue_of(sessions: sessionmaker[Session], job_id: str) -> str:
    with sessions() as session:
        return session.scalar(select(Job.gpu_class).where(Job.id == job_id)) or "cpu"


def _train_claimed(
    job: Job,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    owner: str,
    settings: Settings,
    workdir: Path,
) -> str:
    from worker.training import train

    hooks = JobHooks(sessions=sessions, store=store, job=job, owner=owner, settings=settings)
    try:
        with sessions() as session:
            model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == job.model))
            if model is None:
                raise RuntimeError(f"base model {job.model!r} is no longer registered")
            base_path = resolve_base_model(model)
            train_path = workdir / "train.jsonl"
            files = {
                f.id: f
                for f in session.scalars(
                    select(File).where(File.id.in_([job.training_file, job.validation_file or ""]))
                )
            }
            if job.training_file not in files:
                raise RuntimeError(f"training file {job.training_file} was deleted")
            store.download_file(files[job.training_file].storage_key, train_path)
            val_path = None
            if job.validation_file:
                if job.validation_file not in files:
                    raise RuntimeError(f"validation file {job.validation_file} was deleted")
                val_path = workdir / "validation.jsonl"
                store.download_file(files[job.validation_file].storage_key, val_path)
            resume = _fetch_checkpoint(store, session, job, workdir / "resume")
        if resume is not None:
            with sessions.begin() as session:
                record_event(
                    session,
                    session.get(Job, job.id) or job,
                    f"Resuming from checkpoint {resume.name}",
                )
        spec = TrainSpec(**job.spec)
        try:
            result = train(
                spec,
                train_path,
                workdir / "out",
                hooks,
                validation_path=val_path,
                resume_from=resume,
                base_model_path=base_path,
            )
        except CheckpointError as exc:
            if resume is None:
                raise
            # An unusable checkpoint costs the steps since the start, not the job.
            with sessions.begin() as session:
                record_event(
                    session,
                    session.get(Job, job.id) or job,
                    level="warn",
                    message=f"Checkpoint {resume.name} is unusable ({exc}); "
                    "starting over from step 0",
                )
            result = train(
                spec,
                train_path,
                workdir / "out2",
                hooks,
                validation_path=val_path,
                base_model_path=base_path,
            )
    except Exception as exc:
        log.exception("job %s failed", job.id)
        with sessions.begin() as session:
            current = session.get(Job, job.id)
            assert current is not None
            leases.finish(
                session,
                current,
                owner=owner,
                target=JobStatus.FAILED,
                level="error",
                message=f"Job failed: {type(exc).__name__}: {exc}"[:1000],
                error_code="training_error",
                error_message=f"{type(exc).__name__}: {exc}"[:1000],
            )
        return "failed"

    with sessions.begin() as session:
        current = session.get(Job, job.id)
        assert current is not None
        if result.stopped is StopRequest.PREEMPT:
            leases.finish(
                session,
                current,
                owner=owner,
                target=JobStatus.QUEUED,
                level="warn",
                message=f"Worker shutting down at step {result.step}; checkpoint saved, "
                "job requeued",
            )
            return "preempted"
        if result.stopped is StopRequest.CANCEL:
            if hooks.lease_lost:
                return "lease_lost"
            leases.finish(
                session,
                current,
                owner=owner,
                target=JobStatus.CANCELLED,
                message=f"Job cancelled at step {result.step}",
            )
            return "cancelled"
    return _store_adapter(job, result, sessions=sessions, store=store, owner=owner)


def _store_adapter(
    job: Job, result: Any, *, sessions: sessionmaker[Session], store: ObjectStore, owner: str
) -> str:
    assert result.output_dir is not None
    adapter_id = new_id("adapter")
    prefix = adapter_prefix(job.tenant_id, adapter_id)
    store.upload_dir(prefix, result.output_dir)
    store.put_bytes(prefix + ARCHIVE_NAME, _archive(result.output_dir))
    name = f"ft:{job.model}:{job.suffix or 'qlora'}:{adapter_id}"
    metrics = {k: v for k, v in result.metrics.items() if k != "history"}
    with sessions.begin() as session:
        current = session.get(Job, job.id)
        assert current is not None
        moved = leases.finish(
            session,
            current,
            owner=owner,
            target=JobStatus.SUCCEEDED,
            message=f"Job succeeded: adapter {name}",
            fine_tuned_model=name,
            adapter_id=adapter_id,
            trained_tokens=result.trained_tokens,
            eval_loss=_finite(metrics.get("eval_loss_after")),
            step=result.step,
            eta_seconds=0.0,
        )
        if moved:
            session.add(
                Adapter(
                    id=adapter_id,
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    base_model=job.model,
                    name=name,
                    storage_prefix=prefix,
                    metrics=metrics,
                    spec=job.spec,
                )
            )
    if not moved:  # lost the lease at the last moment: someone else owns the job now
        store.delete_prefix(prefix)
        return "lease_lost"
    return "succeeded"
