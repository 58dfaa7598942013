"""A worker's run of a job, as database verbs: claim, renew, record progress, record a
checkpoint, complete, fail, cancel, release, defer.

Every write after the claim is **fenced**: it carries the `Lease` (owner and attempt) and is
refused in the same conditional statement when that attempt no longer holds the job. A worker
that lost its lease (frozen past it, partitioned, too slow) therefore cannot publish progress,
events, checkpoints, an adapter or a final state over the new owner's. Services flush; the
caller (the worker) owns the transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from shared.errors import NotFound
from shared.events import record_event
from shared.ids import derived_id
from shared.jobs import outbox, retention
from shared.jobs.faults import JobFault
from shared.jobs.sources import find_trained, is_trained_name
from shared.jobs.states import TERMINAL, JobStatus, set_status
from shared.models import Adapter, Checkpoint, File, Job, JobEvent, RegisteredModel, Tenant, utcnow
from shared.storage import adapter_prefix, check_prefix
from shared.tenancy.service import tenant_slug

WAITING_CODE = "waiting_for_slot"


def checkpoint_prefix(tenant_id: str, job_id: str, attempt: int, step: int) -> str:
    """Checkpoints are attempt-scoped: a stale attempt can never overwrite the owner's files."""
    return check_prefix(f"checkpoints/{tenant_id}/{job_id}/attempt-{int(attempt)}/step-{int(step)}")


def job_checkpoints_root(tenant_id: str, job_id: str) -> str:
    return check_prefix(f"checkpoints/{tenant_id}/{job_id}")


def attempt_adapter_id(job_id: str, attempt: int) -> str:
    """The adapter an attempt uploads: derived from the job and attempt, so an attempt killed
    between its upload and its final write leaves objects the job's ending can find."""
    return derived_id("adapter", job_id, str(int(attempt)))


def forget_unrecorded_adapters(session: Session, job: Job) -> int:
    """Schedule the deletion of every attempt's adapter upload except the recorded one (a
    worker killed after uploading, before recording). Called when a job ends."""
    count = 0
    for attempt in range(1, job.attempt + 1):
        adapter_id = attempt_adapter_id(job.id, attempt)
        if adapter_id != job.adapter_id:
            retention.schedule_deletion(session, adapter_prefix(job.tenant_id, adapter_id))
            count += 1
    return count


@dataclass(frozen=True)
class Lease:
    """Proof of a claim: the owner and the attempt that holds the job."""

    job_id: str
    tenant_id: str
    owner: str
    attempt: int

    def holds(self) -> ColumnElement[bool]:
        """The fence every write carries."""
        return and_(
            Job.id == self.job_id,
            Job.status == JobStatus.RUNNING.value,
            Job.lease_owner == self.owner,
            Job.attempt == self.attempt,
        )

    def owned(self) -> ColumnElement[bool]:
        """The fence as an extra condition of `set_status` (which adds id and status)."""
        return and_(Job.lease_owner == self.owner, Job.attempt == self.attempt)


class ClaimOutcome(enum.StrEnum):
    CLAIMED = "claimed"
    WAITING_TURN = "waiting_turn"  # queued, but the tenant's running slots are full
    NOT_CLAIMABLE = "not_claimable"  # taken by another worker, finished, cancelled, gone


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    lease: Lease | None = None


def claim(session: Session, *, job_id: str, owner: str, lease_seconds: float) -> Claim:
    """Take `job_id` if it is queued (or running on an expired lease), attempts remain and the
    tenant is under its running-jobs limit; through the transitions table like every move.

    The tenant row is locked first, so concurrent claims for one tenant run one after the other
    and each counts the others' committed claims: the limit holds under any concurrency.
    """
    job = session.get(Job, job_id)
    if job is None:
        return Claim(ClaimOutcome.NOT_CLAIMABLE)
    session.execute(select(Tenant.id).where(Tenant.id == job.tenant_id).with_for_update())
    session.refresh(job)
    now = utcnow()
    other = aliased(Job)
    running_elsewhere = (
        select(func.count())
        .select_from(other)
        .where(other.tenant_id == Job.tenant_id, other.status == "running", other.id != Job.id)
        .scalar_subquery()
    )
    limit = select(Tenant.max_running_jobs).where(Tenant.id == Job.tenant_id).scalar_subquery()
    claimable = and_(
        Job.id == job_id,
        Job.cancel_requested.is_(False),
        Job.attempt < Job.max_attempts,
        or_(Job.status == "queued", Job.lease_expires_at < now),  # running: lease expired
    )
    moved = set_status(
        session,
        job,
        JobStatus.RUNNING,
        expect=(JobStatus.QUEUED, JobStatus.RUNNING),
        extra_where=and_(claimable, running_elsewhere < limit),
        message=f"Worker {owner} started attempt {job.attempt + 1} of {job.max_attempts}",
        data={"attempt": job.attempt + 1, "worker": owner},
        lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        attempt=Job.attempt + 1,
        started_at=func.coalesce(Job.started_at, now),
    )
    if not moved:
        waiting = session.scalar(
            select(func.count()).select_from(Job).where(claimable, Job.status == "queued")
        )
        return Claim(ClaimOutcome.WAITING_TURN if waiting else ClaimOutcome.NOT_CLAIMABLE)
    return Claim(ClaimOutcome.CLAIMED, Lease(job.id, job.tenant_id, owner, job.attempt))


def defer(session: Session, *, job_id: str, delay_s: float) -> bool:
    """A job waiting for its tenant's running slot: offer it again after `delay_s` through the
    outbox (one pending message per job) and say so once in its events."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.status != JobStatus.QUEUED.value or outbox.has_pending(session, job_id):
        return False
    outbox.enqueue(session, job, delay_s=delay_s)
    last = session.scalar(
        select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()).limit(1)
    )
    if last is None or (last.data or {}).get("code") != WAITING_CODE:
        limit = session.scalar(select(Tenant.max_running_jobs).where(Tenant.id == job.tenant_id))
        record_event(
            session,
            job,
            f"Waiting for a running slot: this organization already runs {limit} job(s), its "
            "limit; the job starts when one finishes",
            data={"code": WAITING_CODE, "max_running_jobs": limit},
        )
    return True


@dataclass(frozen=True)
class LeaseState:
    held: bool
    cancel_requested: bool
    pause_requested: bool = False


def renew(session: Session, lease: Lease, *, lease_seconds: float) -> LeaseState:
    """Extend the lease; tells whether this attempt still holds it and whether a cancel or a
    pause was asked."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(lease.holds())
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return LeaseState(held=False, cancel_requested=False)
    cancel, pause = session.execute(
        select(Job.cancel_requested, Job.pause_requested).where(Job.id == lease.job_id)
    ).one()
    return LeaseState(held=True, cancel_requested=bool(cancel), pause_requested=bool(pause))


def _locked(session: Session, lease: Lease) -> Job | None:
    """The job row, locked, if this attempt still holds it (the fence for an event insert)."""
    return session.scalar(select(Job).where(lease.holds()).with_for_update())


def record_run_event(
    session: Session,
    lease: Lease,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> bool:
    """An event of the run, refused when the attempt no longer holds the job."""
    job = _locked(session, lease)
    if job is None:
        return False
    record_event(session, job, message, level=level, type=type, data=data)
    return True


def record_progress(
    session: Session,
    lease: Lease,
    *,
    progress: dict[str, Any],
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Write progress columns (and a metrics event) in one fenced update."""
    result = session.execute(
        update(Job)
        .where(lease.holds())
        .values(updated_at=utcnow(), **progress)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    if message is not None:
        job = session.get(Job, lease.job_id)
        assert job is not None
        record_event(session, job, message, type="metrics", data=data)
    return True


def record_checkpoint(
    session: Session,
    lease: Lease,
    *,
    step: int,
    prefix: str,
    metrics: dict[str, Any],
    keep_last: int,
) -> bool:
    """Record a checkpoint whose objects are uploaded and verified under `prefix`; then keep
    the newest `keep_last` plus the best by eval loss. Refused if the lease is gone."""
    job = _locked(session, lease)
    if job is None:
        return False
    redone = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == lease.job_id, Checkpoint.step == step)
    )
    if redone is not None:  # an earlier attempt's checkpoint at this step is replaced
        retention.drop_checkpoints(session, [redone])
    session.add(
        Checkpoint(
            id=_new_checkpoint_id(),
            job_id=lease.job_id,
            tenant_id=lease.tenant_id,
            step=step,
            attempt=lease.attempt,
            metrics=metrics,
            storage_prefix=prefix,
        )
    )
    session.flush()
    retention.prune_job_checkpoints(session, job_id=lease.job_id, keep_last=keep_last)
    record_event(session, job, f"Checkpoint saved at step {step}", data={"checkpoint_step": step})
    return True


def _new_checkpoint_id() -> str:
    from shared.ids import new_id

    return new_id("checkpoint")


def resume_candidates(session: Session, *, job_id: str) -> list[tuple[int, str]]:
    """(step, prefix) of the job's checkpoints, newest first: the resume order."""
    rows = session.execute(
        select(Checkpoint.step, Checkpoint.storage_prefix)
        .where(Checkpoint.job_id == job_id)
        .order_by(Checkpoint.step.desc())
    )
    return [(int(step), str(prefix)) for step, prefix in rows]


@dataclass(frozen=True)
class JobSummary:
    model: str
    suffix: str | None
    spec: dict[str, Any]
    tenant_slug: str


def job_summary(session: Session, lease: Lease) -> JobSummary:
    job = session.get(Job, lease.job_id)
    tenant = session.get(Tenant, lease.tenant_id)
    assert job is not None and tenant is not None
    return JobSummary(
        model=job.model, suffix=job.suffix, spec=dict(job.spec), tenant_slug=tenant_slug(tenant)
    )


@dataclass(frozen=True)
class JobInputs:
    spec: dict[str, Any]
    model_source: str
    model_revision: str | None
    training_key: str
    validation_key: str | None
    # A job continuing from a fine-tuned model or checkpoint: its adapter weights' object key.
    init_weights_key: str | None = None
    integrations: list[dict[str, Any]] = field(default_factory=list)


def load_inputs(session: Session, lease: Lease) -> JobInputs:
    """What the run needs from the database; a missing model or file is a permanent fault."""
    job = session.get(Job, lease.job_id)
    assert job is not None
    base = str((job.spec or {}).get("base_model", job.model))
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == base))
    if model is None:
        raise JobFault("base_model_unavailable")
    init_weights_key = None
    if is_trained_name(job.model):
        try:
            source = find_trained(session, tenant_id=job.tenant_id, name=job.model)
        except NotFound:
            raise JobFault("source_model_unavailable") from None
        init_weights_key = source.weights_key
    train = session.get(File, job.training_file)
    if train is None or train.tenant_id != job.tenant_id:
        raise JobFault("training_file_missing")
    validation_key = None
    if job.validation_file:
        val = session.get(File, job.validation_file)
        if val is None or val.tenant_id != job.tenant_id:
            raise JobFault("validation_file_missing")
        validation_key = val.storage_key
    return JobInputs(
        spec=dict(job.spec),
        model_source=model.source,
        model_revision=model.revision,
        training_key=train.storage_key,
        validation_key=validation_key,
        init_weights_key=init_weights_key,
        integrations=list(job.integrations or []),
    )


def _finish(
    session: Session,
    lease: Lease,
    target: JobStatus,
    *,
    message: str,
    level: str = "info",
    **fields: Any,
) -> bool:
    job = session.get(Job, lease.job_id)
    assert job is not None
    moved = set_status(
        session,
        job,
        target,
        message=message,
        expect=JobStatus.RUNNING,
        extra_where=lease.owned(),
        level=level,
        **fields,
    )
    if moved:
        outbox.wake_waiting(session, tenant_id=lease.tenant_id)
        if target in TERMINAL:
            forget_unrecorded_adapters(session, job)
    return moved


def complete(
    session: Session,
    lease: Lease,
    *,
    adapter: Adapter,
    result_file: File | None = None,
    **fields: Any,
) -> bool:
    """Succeed the job and record its adapter (and results file), or nothing if the lease is
    gone."""
    if result_file is not None:
        fields["result_files"] = [result_file.id]
    moved = _finish(
        session,
        lease,
        JobStatus.SUCCEEDED,
        message=f"Job succeeded: adapter {adapter.name}",
        fine_tuned_model=adapter.name,
        adapter_id=adapter.id,
        **fields,
    )
    if moved:
        session.add(adapter)
        if result_file is not None:
            session.add(result_file)
        session.flush()
    return moved


def fail(session: Session, lease: Lease, *, code: str, message: str) -> bool:
    return _finish(
        session,
        lease,
        JobStatus.FAILED,
        message=f"Job failed: {message}",
        level="error",
        error_code=code,
        error_message=message,
    )


def cancel(session: Session, lease: Lease, *, step: int) -> bool:
    return _finish(session, lease, JobStatus.CANCELLED, message=f"Job cancelled at step {step}")


def pause(session: Session, lease: Lease, *, step: int) -> bool:
    """The worker checkpointed after a pause request: the job waits in `paused` (no lease, no
    running slot) until resumed. Pausing is not a failure, so the attempt is given back."""
    job = session.get(Job, lease.job_id)
    assert job is not None
    return _finish(
        session,
        lease,
        JobStatus.PAUSED,
        message=f"Job paused at step {step}; checkpoint saved, GPU released",
        data={"step": step},
        step=step,  # where it continues: the checkpoint's step, not the last progress write
        lease_owner=None,
        lease_expires_at=None,
        pause_requested=False,
        max_attempts=job.max_attempts + 1,
    )


def release(
    session: Session,
    lease: Lease,
    *,
    message: str,
    give_back_attempt: bool,
    delay_s: float = 0.0,
) -> bool:
    """Put a held job back in the queue.

    A graceful release (preemption) is not the job's failure: it gets its attempt back as an
    extra one. A release after a transient fault counts the attempt; with none left the job
    fails with `transient_retries_exhausted` instead of waiting in `queued` for nothing.
    """
    job = session.get(Job, lease.job_id)
    assert job is not None
    if not give_back_attempt and job.attempt >= job.max_attempts:
        return fail(
            session,
            lease,
            code="transient_retries_exhausted",
            message="a dependency (object store, database or broker) stayed unavailable on "
            f"all {job.max_attempts} attempts; create the job again once the service is healthy",
        )
    extra = {"max_attempts": job.max_attempts + 1} if give_back_attempt else {}
    moved = _finish(
        session,
        lease,
        JobStatus.QUEUED,
        message=message,
        level="warn",
        lease_owner=None,
        lease_expires_at=None,
        **extra,
    )
    if moved:
        outbox.enqueue(session, job, delay_s=delay_s)
    return moved
