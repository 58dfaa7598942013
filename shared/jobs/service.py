"""Jobs: admission, reads, cancel. Services flush; the caller (API or worker) commits."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, Text, cast, delete, func, or_, select
from sqlalchemy.orm import Session

from shared import adapters, workers
from shared.broker import CPU_QUEUE, queue_for_class
from shared.config import Settings
from shared.errors import Conflict, Invalid, NotFound, RateLimited
from shared.estimate import MemoryEstimate, ModelShape, estimate_memory
from shared.events import record_event
from shared.files import service as files
from shared.ids import new_id
from shared.jobs import outbox, retention, runs, sources
from shared.jobs.schemas import DpoHyperparameters, JobCreate, MetadataFilter
from shared.jobs.sources import TrainedSource
from shared.jobs.states import ACTIVE, JobStatus, set_status
from shared.models import (
    Adapter,
    Checkpoint,
    Job,
    JobEvent,
    OutboxMessage,
    RegisteredModel,
    Tenant,
)
from shared.pagination import newest_first
from shared.tenancy.service import CHAT_TEMPLATE_FLAG, get_model_by_name
from shared.train_spec import TrainSpec

BASE_LEARNING_RATE = 2e-4
# Runs this small train on a CPU worker: the embedded default and CI have no GPU.
CPU_QUEUE_MAX_PARAMS = 50_000_000
DEFAULT_MAX_ATTEMPTS = 3
QUEUED_RETRY_AFTER_S = 30
# "auto" hyperparameters (`build_spec`): OpenAI's epoch rule, QLoRA's micro-batch of 4.
AUTO_EPOCHS = 3
AUTO_MIN_EXAMPLES = 100
AUTO_MAX_EXAMPLES = 25_000
AUTO_MAX_EPOCHS = 25
AUTO_BATCH_SIZES = (4, 2, 1)
INTEGRATION_NAMES = {"wandb": "Weights & Biases", "mlflow": "MLflow"}


def _hyperparameters(body: JobCreate) -> dict[str, Any]:
    hp = body.hyperparameters
    if hp is None and body.method is not None and body.method.supervised is not None:
        hp = body.method.supervised.hyperparameters
    if body.method is not None and body.method.type == "dpo":  # DPO's own block has beta
        dpo = body.method.dpo.hyperparameters if body.method.dpo is not None else None
        if dpo is None:
            dpo = DpoHyperparameters(**(hp.model_dump() if hp is not None else {}))
        return dpo.model_dump()
    return (
        hp.model_dump()
        if hp is not None
        else {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    )


def _method(body: JobCreate) -> str:
    return body.method.type if body.method is not None else "supervised"


def auto_epochs(train_rows: int) -> int:
    """`n_epochs: "auto"`, OpenAI's rule: 3 passes, more for small files so that about
    `AUTO_MIN_EXAMPLES` examples are seen (at most 25 passes), fewer for large files so that
    about `AUTO_MAX_EXAMPLES` are (at least 1)."""
    rows = max(1, train_rows)
    if rows * AUTO_EPOCHS < AUTO_MIN_EXAMPLES:
        return min(AUTO_MAX_EPOCHS, AUTO_MIN_EXAMPLES // rows)
    if rows * AUTO_EPOCHS > AUTO_MAX_EXAMPLES:
        return max(1, AUTO_MAX_EXAMPLES // rows)
    return AUTO_EPOCHS


def resolve_model(
    session: Session, *, tenant_id: str, name: str
) -> tuple[RegisteredModel, TrainedSource | None]:
    """The registered base a job's `model` trains on, and the tenant's fine-tuned model or
    checkpoint it continues from (None when `model` is a base model). 404 `model_not_found`
    for an unknown name, another tenant's included."""
    if not sources.is_trained_name(name):
        return get_model_by_name(session, name=name), None
    source = sources.find_trained(session, tenant_id=tenant_id, name=name)
    return get_model_by_name(session, name=source.base_model), source


def _inherit_lora_shape(
    values: dict[str, Any], qlora: dict[str, Any], source: TrainedSource
) -> None:
    """A continued job trains the source's adapter further: its LoRA shape is the source's."""
    for name in sources.LORA_SHAPE_FIELDS:
        if name not in source.spec:
            continue
        inherited = source.spec[name]
        if name in qlora and qlora[name] != inherited:
            raise Invalid(
                f"qlora.{name}: {source.name!r} was trained with {name}={inherited!r}; a job "
                "continuing from it keeps its LoRA shape (omit the field to inherit it)",
                param=f"qlora.{name}",
                code="incompatible_adapter",
            )
        values[name] = inherited


def build_spec(
    body: JobCreate,
    *,
    source: TrainedSource | None = None,
    train_rows: int | None = None,
    model: RegisteredModel | None = None,
) -> TrainSpec:
    """Translate OpenAI hyperparameters and the `qlora` block into one validated TrainSpec.

    The `qlora` block wins over the OpenAI names where both set the same thing. "auto" (or
    omitted) hyperparameters are resolved here (docs/service.md): `n_epochs` from
    `train_rows` (`auto_epochs`), `batch_size` the largest of 4, 2, 1 not above `train_rows`
    whose memory estimate on `model` fits a GPU class, `learning_rate_multiplier` 1 (QLoRA's
    2e-4). A job continuing from `source` takes its LoRA shape.
    """
    values: dict[str, Any] = {}
    hp = _hyperparameters(body)
    if hp["n_epochs"] != "auto":
        values["num_epochs"] = hp["n_epochs"]
    elif train_rows is not None:
        values["num_epochs"] = auto_epochs(train_rows)
    if hp["batch_size"] != "auto":
        values["batch_size"] = hp["batch_size"]
    if hp["learning_rate_multiplier"] != "auto":
        values["learning_rate"] = BASE_LEARNING_RATE * float(hp["learning_rate_multiplier"])
    if body.seed is not None:
        values["seed"] = body.seed
    if _method(body) == "dpo":
        values["method"] = "dpo"
        if hp.get("beta", "auto") != "auto":
            values["dpo_beta"] = hp["beta"]
    qlora = dict(body.qlora or {})
    if "method" in qlora:
        raise Invalid("qlora.method: set the method with `method.type`", param="qlora.method")
    if "base_model" in qlora:
        raise Invalid("qlora.base_model: set the base model with `model`", param="qlora.base_model")
    if source is not None:
        _inherit_lora_shape(values, qlora, source)
    values.update(qlora)
    values["base_model"] = source.base_model if source is not None else body.model
    try:
        spec = TrainSpec(**values)
        if hp["batch_size"] == "auto" and "batch_size" not in qlora:
            spec = _auto_batch_size(spec, train_rows, model)
        if "checkpoint_steps" not in qlora:
            spec = _epoch_checkpoints(spec, train_rows)
        return spec
    except ValidationError as exc:
        first = exc.errors()[0]
        # The spec is flat: the field is the first part (then list indexes or union members).
        loc = str(first["loc"][0]) if first["loc"] else ""
        message = str(first["msg"]).removeprefix("Value error, ")
        named, _, rest = message.partition(":")
        if named in TrainSpec.model_fields and (not loc or named == loc):
            loc, message = named, rest.strip()  # a rule whose message names its field
        param = f"qlora.{loc}" if loc else "qlora"
        raise Invalid(f"{param}: {message}", param=param) from exc


def _auto_batch_size(
    spec: TrainSpec, train_rows: int | None, model: RegisteredModel | None
) -> TrainSpec:
    """`batch_size: "auto"`: the largest of `AUTO_BATCH_SIZES` that is not above the training
    rows and whose memory estimate fits a GPU class (the smallest when none does)."""
    candidates = [b for b in AUTO_BATCH_SIZES if train_rows is None or b <= max(1, train_rows)]
    for size in candidates:
        candidate = spec.model_copy(update={"batch_size": size})
        if model is None or not model.config or estimate(model, candidate)[1] is not None:
            return TrainSpec(**candidate.model_dump())  # validated again
    return spec.model_copy(update={"batch_size": candidates[-1]})


def _epoch_checkpoints(spec: TrainSpec, train_rows: int | None) -> TrainSpec:
    """Unless `qlora.checkpoint_steps` says otherwise, a job checkpoints every 200 steps or at
    the end of each epoch but the last (whose result is the fine-tuned model itself), whichever
    comes more often, as OpenAI keeps one checkpoint per epoch: scripts that pick a checkpoint
    find some. Steps per epoch are counted from the file's rows (`ceil(rows / (batch_size *
    gradient_accumulation_steps))`), so a row the template splits into several sequences, or
    rows held out for validation, move them off the exact epoch boundary by a few steps. Runs
    bounded by `max_steps`, one-epoch runs, and token-budget batches (`max_tokens_per_batch`:
    an epoch's step count depends on the token lengths, unknown here) keep the default."""
    if spec.max_steps is not None or spec.num_epochs < 2 or not train_rows:
        return spec
    if spec.max_tokens_per_batch is not None:  # epoch boundaries depend on token lengths
        return spec
    per_epoch = -(-train_rows // (spec.batch_size * spec.gradient_accumulation_steps))
    if spec.checkpoint_steps is not None and spec.checkpoint_steps <= per_epoch:
        return spec
    return TrainSpec(**{**spec.model_dump(), "checkpoint_steps": per_epoch})


def reported_hyperparameters(hp: dict[str, Any], spec: TrainSpec) -> dict[str, Any]:
    """What a job reports as `hyperparameters` (top level and `method.<type>`): the values
    actually used in place of "auto", and the whole QLoRA spec under `qlora`."""
    reported = dict(hp)
    reported["n_epochs"] = spec.num_epochs
    reported["batch_size"] = spec.batch_size
    reported["learning_rate_multiplier"] = round(spec.learning_rate / BASE_LEARNING_RATE, 10)
    if "beta" in reported:
        reported["beta"] = spec.dpo_beta
    reported["qlora"] = {
        k: v for k, v in spec.model_dump(mode="json").items() if k not in ("base_model", "method")
    }
    return reported


def check_integrations(body: JobCreate, settings: Settings) -> list[dict[str, Any]] | None:
    """The job's integrations as stored; one the deployment has not configured is a 400."""
    if not body.integrations:
        return None
    for index, item in enumerate(body.integrations):
        if item.type not in settings.tracking_integrations:
            raise Invalid(
                f"integrations[{index}]: {INTEGRATION_NAMES[item.type]} is not configured on "
                "this service; ask its operators to enable it, or leave the integration out",
                param="integrations",
                code="integration_not_configured",
            )
    return [item.stored() for item in body.integrations]


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
        # Never the exception's text: name the missing key, or say what kind of problem it is.
        missing = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
        reason = (
            f"its config lacks {str(missing)[:64]!r}"
            if missing is not None
            else "its config holds values the estimator cannot read"
        )
        raise Invalid(
            f"cannot estimate memory for {model.name!r}: {reason}", param="model"
        ) from exc
    if shape.total_params() <= CPU_QUEUE_MAX_PARAMS:
        return result, CPU_QUEUE
    return result, queue_for_class(result.gpu_class) if result.gpu_class else None


def estimate_dict(result: MemoryEstimate) -> dict[str, Any]:
    return asdict(result)


def _check_files(session: Session, tenant: Tenant, body: JobCreate, model: RegisteredModel) -> int:
    """Check the job's files; returns the training file's row count."""
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
    if (train.format == "preference") != (_method(body) == "dpo"):
        raise Invalid(
            f"training_file holds {train.format} rows, but method {_method(body)} trains on "
            + ("preference rows" if _method(body) == "dpo" else "chat or prompt rows")
            + " (preference rows train with method.type dpo)",
            param="training_file",
            code="invalid_training_file",
        )
    if train.format in ("chat", "preference") and not (model.config or {}).get(
        CHAT_TEMPLATE_FLAG, True
    ):
        raise Invalid(
            f"base model {model.name!r} has no chat template, so it cannot train chat rows",
            param="training_file",
        )
    return int(train.rows)


def create_job(
    session: Session,
    *,
    tenant: Tenant,
    body: JobCreate,
    idempotency_key: str | None,
    settings: Settings,
) -> tuple[Job, OutboxMessage]:
    """Admit a job: files, model, estimate, limits; insert it queued plus its outbox row."""
    model, source = resolve_model(session, tenant_id=tenant.id, name=body.model)
    train_rows = _check_files(session, tenant, body, model)
    integrations = check_integrations(body, settings)
    spec = build_spec(body, source=source, train_rows=train_rows, model=model)
    result, queue = estimate(model, spec)
    if queue is None:
        raise Invalid(
            f"the job needs about {result.total_bytes / 2**30:.1f} GiB of GPU memory, more "
            "than the largest GPU class (80g) holds; lower batch_size or max_seq_length",
            param="qlora",
            code="exceeds_gpu_memory",
            extra={"estimate": estimate_dict(result)},
        )
    # Lock the tenant row: concurrent submits count each other's committed jobs.
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
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
        hyperparameters=reported_hyperparameters(_hyperparameters(body), spec),
        integrations=integrations,
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
    workers.note_admission(session, settings, job)
    return job, outbox.enqueue(session, job, caller_sends=True)


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")
    return job


def _metadata_is(session: Session, key: str, value: str) -> ColumnElement[bool]:
    if session.get_bind().dialect.name == "sqlite":
        # A json_extract path cannot name a key holding a quote, a backslash or non-ASCII
        # characters (stored \\u-escaped); json_each decodes keys and values.
        pairs = func.json_each(Job.user_metadata).table_valued("key", "value")
        return select(pairs.c.key).where(pairs.c.key == key, pairs.c.value == value).exists()
    stored: ColumnElement[str] = Job.user_metadata[key].as_string()
    return stored == value


def list_jobs(
    session: Session,
    *,
    tenant_id: str,
    after: str | None,
    limit: int,
    metadata: MetadataFilter | None = None,
) -> tuple[list[Job], bool]:
    """Newest first; with `metadata`, only the jobs whose metadata holds every pair (or, for
    `metadata=null`, that have none). `after` may name a job outside the filter."""
    anchor = get_job(session, tenant_id=tenant_id, job_id=after) if after is not None else None
    query = select(Job).where(Job.tenant_id == tenant_id)
    if metadata is not None and metadata.only_null:
        # A job created without metadata holds JSON null (or SQL NULL).
        query = query.where(
            or_(Job.user_metadata.is_(None), cast(Job.user_metadata, Text) == "null")
        )
    for key, value in (metadata.pairs if metadata is not None else {}).items():
        query = query.where(_metadata_is(session, key, value))
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
    runs.forget_unrecorded_adapters(session, job)  # an earlier attempt killed after its upload
    return job


def pause_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """A queued job pauses at once; a running one is flagged, and its worker checkpoints at the
    next step, releases the GPU and moves it to `paused`. Pausing a paused job is a no-op."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    status = JobStatus(job.status)
    if status is JobStatus.PAUSED:
        return job
    if status not in ACTIVE or job.cancel_requested:
        reason = "cancellation was requested" if job.cancel_requested else f"it is {job.status}"
        raise Conflict(
            f"the job cannot be paused: {reason}",
            param="fine_tuning_job_id",
            code="job_not_pausable",
        )
    if status is JobStatus.RUNNING:
        if not job.pause_requested:
            job.pause_requested = True
            record_event(
                session, job, "Pause requested; the job checkpoints at its next step and stops"
            )
            session.flush()
        return job
    if not set_status(session, job, JobStatus.PAUSED, message="Job paused before it started"):
        session.refresh(job)  # a worker claimed it meanwhile: fall back to the flag
        return pause_job(session, tenant_id=tenant_id, job_id=job_id)
    return job


def resume_job(
    session: Session, *, tenant_id: str, job_id: str
) -> tuple[Job, OutboxMessage | None]:
    """A paused job is queued again and continues from its last checkpoint; a running job whose
    pause was requested keeps running (the request is withdrawn). Resuming a queued or running
    job is a no-op. Returns the outbox row to relay, if any."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    status = JobStatus(job.status)
    if status not in ACTIVE or job.cancel_requested:
        reason = "cancellation was requested" if job.cancel_requested else f"it is {job.status}"
        raise Conflict(
            f"the job cannot be resumed: {reason}",
            param="fine_tuning_job_id",
            code="job_not_resumable",
        )
    if status is JobStatus.RUNNING and job.pause_requested:
        job.pause_requested = False
        record_event(session, job, "Pause withdrawn; the job keeps running")
        session.flush()
        return job, None
    if status is not JobStatus.PAUSED:
        return job, None
    if not set_status(
        session,
        job,
        JobStatus.QUEUED,
        message="Job resumed; queued to continue from its last checkpoint",
        expect=JobStatus.PAUSED,
    ):
        raise Conflict("the job changed meanwhile; retry", code="job_changed")
    return job, outbox.enqueue(session, job, caller_sends=True)


def delete_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Delete a finished job and everything it produced: its adapter, results file and
    checkpoints (rows now, objects scheduled in the same transaction, see
    `shared.jobs.retention`), events and outbox rows (events and checkpoint rows also go by the
    foreign keys' cascade). An active job must be cancelled first (409 `job_not_deletable`)."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if JobStatus(job.status) in ACTIVE:
        raise Conflict(
            f"the job is {job.status}; cancel it first",
            param="fine_tuning_job_id",
            code="job_not_deletable",
        )
    adapter = session.scalar(select(Adapter.id).where(Adapter.job_id == job.id))
    if adapter is not None:
        adapters.delete_adapter(session, tenant_id=tenant_id, adapter_id=adapter)
    else:
        retention.drop_checkpoints(
            session, session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()
        )
        retention.schedule_deletion(session, runs.job_checkpoints_root(tenant_id, job.id))
    for file_id in job.result_files or []:
        files.delete_file(session, tenant_id=tenant_id, file_id=file_id)
    session.execute(delete(OutboxMessage).where(OutboxMessage.job_id == job.id))
    session.delete(job)
    session.flush()
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


def parse_event_id(value: str, *, param: str = "after") -> int:
    """`ftevent-{seq}` or a bare `seq` (as SSE's Last-Event-ID carries it): 1 to 18 ASCII digits."""
    raw = value.removeprefix("ftevent-")
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise Invalid(f"{param}: not an event id", param=param)
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
