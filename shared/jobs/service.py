"""Jobs: admission, reads, cancel. Services flush; the caller (API or worker) commits."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.errors import Conflict, Invalid, NotFound, RateLimited
from shared.estimate import MemoryEstimate, ModelShape, estimate_memory
from shared.events import record_event
from shared.files import service as files
from shared.ids import new_id
from shared.jobs.schemas import JobCreate
from shared.jobs.states import ACTIVE, JobStatus, set_status
from shared.models import Checkpoint, Job, JobEvent, OutboxMessage, RegisteredModel, Tenant
from shared.pagination import newest_first
from shared.tenancy.service import CHAT_TEMPLATE_FLAG, get_model_by_name
from shared.train_spec import TrainSpec

BASE_LEARNING_RATE = 2e-4
# Runs this small train on a CPU worker: the embedded default and CI have no GPU.
CPU_QUEUE_MAX_PARAMS = 50_000_000
QUEUES = ("cpu", "gpu-24g", "gpu-48g", "gpu-80g")
DEFAULT_MAX_ATTEMPTS = 3
QUEUED_RETRY_AFTER_S = 30


def _hyperparameters(body: JobCreate) -> dict[str, Any]:
    hp = body.hyperparameters
    if hp is None and body.method is not None and body.method.supervised is not None:
        hp = body.method.supervised.hyperparameters
    return (
        hp.model_dump()
        if hp is not None
        else {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    )


def build_spec(body: JobCreate) -> TrainSpec:
    """Translate OpenAI hyperparameters and the `qlora` block into one validated TrainSpec.

    The `qlora` block wins over the OpenAI names where both set the same thing.
    """
    values: dict[str, Any] = {}
    hp = _hyperparameters(body)
    if hp["n_epochs"] != "auto":
        values["num_epochs"] = hp["n_epochs"]
    if hp["batch_size"] != "auto":
        values["batch_size"] = hp["batch_size"]
    if hp["learning_rate_multiplier"] != "auto":
        values["learning_rate"] = BASE_LEARNING_RATE * float(hp["learning_rate_multiplier"])
    if body.seed is not None:
        values["seed"] = body.seed
    qlora = dict(body.qlora or {})
    if "base_model" in qlora:
        raise Invalid("qlora.base_model: set the base model with `model`", param="qlora.base_model")
    values.update(qlora)
    values["base_model"] = body.model
    try:
        return TrainSpec(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        param = f"qlora.{loc}" if loc else "qlora"
        raise Invalid(f"{param}: {first['msg']}", param=param) from exc


def estimate(model: RegisteredModel, spec: TrainSpec) -> tuple[MemoryEstimate, str | None]:
    """The memory estimate and the queue (GPU class) that can run it, or None if none can."""
    if not model.config:
        raise Invalid(
            f"base model {model.name!r} has no config to estimate memory from", param="model"
        )
    try:
        shape = ModelShape.from_config(model.config)
        result = estimate_memory(shape, spec)
    except (KeyError, ValueError, TypeError) as exc:
        raise Invalid(f"cannot estimate memory for {model.name!r}: {exc}", param="model") from exc
    if shape.total_params() <= CPU_QUEUE_MAX_PARAMS:
        return result, "cpu"
    return result, f"gpu-{result.gpu_class}" if result.gpu_class else None


def estimate_dict(result: MemoryEstimate) -> dict[str, Any]:
    return asdict(result)


def _check_files(session: Session, tenant: Tenant, body: JobCreate, model: RegisteredModel) -> None:
    train = files.get_file(
        session, tenant_id=tenant.id, file_id=body.training_file, param="training_file"
    )
    if train.purpose != "fine-tune":
        raise Invalid("training_file must have purpose fine-tune", param="training_file")
    if body.validation_file is not None:
        val = files.get_file(
            session, tenant_id=tenant.id, file_id=body.validation_file, param="validation_file"
        )
        if val.format != train.format:
            raise Invalid(
                f"validation_file is {val.format} but training_file is {train.format}",
                param="validation_file",
            )
    if train.format == "chat" and not (model.config or {}).get(CHAT_TEMPLATE_FLAG, True):
        raise Invalid(
            f"base model {model.name!r} has no chat template, so it cannot train chat rows",
            param="training_file",
        )


def create_job(
    session: Session, *, tenant: Tenant, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, OutboxMessage]:
    """Admit a job: files, model, estimate, limits; insert it queued plus its outbox row."""
    model = get_model_by_name(session, name=body.model)
    _check_files(session, tenant, body, model)
    spec = build_spec(body)
    result, queue = estimate(model, spec)
    if queue is None:
        raise Invalid(
            f"the job needs about {result.total_bytes / 2**30:.1f} GiB of GPU memory, more "
            "than the largest GPU class (80g) holds; lower batch_size or max_seq_length",
            param="qlora",
            code="exceeds_gpu_memory",
            extra={"estimate": estimate_dict(result)},
        )
    waiting = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.tenant_id == tenant.id,
            Job.status.in_([JobStatus.VALIDATING_FILES.value, JobStatus.QUEUED.value]),
        )
    )
    if (waiting or 0) >= tenant.max_queued_jobs:
        raise RateLimited(
            f"this organization already has {waiting} queued jobs (limit "
            f"{tenant.max_queued_jobs}); retry when some have started",
            headers={"Retry-After": str(QUEUED_RETRY_AFTER_S)},
        )
    job = Job(
        id=new_id("job"),
        tenant_id=tenant.id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        status=JobStatus.VALIDATING_FILES.value,
        spec=spec.model_dump(mode="json"),
        hyperparameters=_hyperparameters(body),
        suffix=body.suffix,
        seed=spec.seed,
        user_metadata=body.metadata,
        gpu_class=queue,
        estimate=estimate_dict(result),
        idempotency_key=idempotency_key,
        max_attempts=DEFAULT_MAX_ATTEMPTS,
    )
    session.add(job)
    session.flush()
    set_status(
        session,
        job,
        JobStatus.QUEUED,
        message=f"Validated files; job queued on {queue} "
        f"(estimated {result.total_bytes / 2**30:.2f} GiB)",
    )
    outbox = OutboxMessage(job_id=job.id, queue=queue)
    session.add(outbox)
    session.flush()
    return job, outbox


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return job


def list_jobs(
    session: Session, *, tenant_id: str, after: str | None, limit: int
) -> tuple[list[Job], bool]:
    anchor = get_job(session, tenant_id=tenant_id, job_id=after) if after is not None else None
    query = select(Job).where(Job.tenant_id == tenant_id)
    return newest_first(session, query, Job, anchor=anchor, limit=limit)


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Queued jobs end at once; a running one is flagged and stops at its next step."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    status = JobStatus(job.status)
    if status not in ACTIVE:
        raise Conflict(
            f"the job is already {job.status}",
            param="fine_tuning_job_id",
            code="job_not_cancellable",
        )
    if status is JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            record_event(session, job, "Cancellation requested; stopping at the next step")
            session.flush()
        return job
    if not set_status(
        session, job, JobStatus.CANCELLED, message="Job cancelled", cancel_requested=True
    ):
        session.refresh(job)  # a worker claimed it meanwhile: fall back to the flag
        return cancel_job(session, tenant_id=tenant_id, job_id=job_id)
    return job


def list_events(
    session: Session, *, job: Job, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    """Newest first, as OpenAI lists them; `after` is an event id from a previous page."""
    query = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        query = query.where(JobEvent.seq < parse_event_id(after))
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def events_since(session: Session, *, job_id: str, seq: int, limit: int = 500) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq)
    return list(session.scalars(query.order_by(JobEvent.seq).limit(limit)))


def parse_event_id(value: str) -> int:
    raw = value.removeprefix("ftevent-")
    if not raw.isdigit():
        raise Invalid(f"{value!r} is not an event id", param="after")
    return int(raw)


def list_checkpoints(
    session: Session, *, job: Job, after: str | None, limit: int
) -> tuple[list[Checkpoint], bool]:
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows = list(session.scalars(query.order_by(Checkpoint.step.desc())))
    if after is not None:
        ids = [r.id for r in rows]
        if after not in ids:
            raise NotFound(f"no checkpoint {after!r}", param="after")
        rows = rows[ids.index(after) + 1 :]
    return rows[:limit], len(rows) > limit


def get_checkpoint(session: Session, *, job: Job, checkpoint_id: str) -> Checkpoint:
    row = session.get(Checkpoint, checkpoint_id)
    if row is None or row.job_id != job.id:
        raise NotFound(f"no checkpoint {checkpoint_id!r}", param="checkpoint_id")
    return row


def metrics_series(session: Session, *, job: Job) -> dict[str, Any]:
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
    )
    series: dict[str, Any] = {"step": [], "loss": [], "lr": [], "tokens_per_second": [], "eval": []}
    for row in rows:
        data = row.data or {}
        if "eval_loss" in data:
            series["eval"].append({"step": data["step"], "eval_loss": data["eval_loss"]})
        elif "loss" in data:
            series["step"].append(data["step"])
            series["loss"].append(data["loss"])
            series["lr"].append(data.get("lr", 0.0))
            series["tokens_per_second"].append(data.get("tokens_per_second", 0.0))
    return series
