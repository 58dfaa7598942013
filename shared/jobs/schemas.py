"""Request and response shapes of the jobs API (OpenAI fine-tuning objects plus `qlora`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import Adapter, Checkpoint, Job, JobEvent

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Auto = Field("auto", description="Epochs; 'auto' uses the qlora default.")
    batch_size: int | Auto = Field("auto", description="Examples per micro-batch.")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Multiplies the base QLoRA learning rate (2e-4)."
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field(description="Only supervised fine-tuning is offered.")
    supervised: SupervisedMethod | None = None


class JobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`. `qlora` takes any `TrainSpec` field but `base_model`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_\-.]+$")
    seed: int | None = Field(None, ge=0, lt=2**32)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported.")
    qlora: dict[str, Any] | None = Field(None, description="TrainSpec fields (the extension).")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int
    total_steps: int | None
    loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    eta_seconds: float | None


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[Any] = []
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None
    # ours
    progress: Progress
    attempt: int
    max_attempts: int
    adapter_id: str | None
    gpu_class: str
    estimate: dict[str, Any] | None
    qlora: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> JobObject:
        estimated_finish = None
        if job.status == "running" and job.eta_seconds is not None:
            estimated_finish = int(job.updated_at.timestamp() + job.eta_seconds)
        return cls(
            id=job.id,
            created_at=int(job.created_at.timestamp()),
            error=JobError(code=job.error_code, message=job.error_message or "")
            if job.error_code
            else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=_ts(job.finished_at),
            hyperparameters=job.hyperparameters,
            model=job.model,
            organization_id=job.tenant_id,
            result_files=[],
            seed=job.seed,
            status=job.status,
            trained_tokens=job.trained_tokens,
            training_file=job.training_file,
            validation_file=job.validation_file,
            estimated_finish=estimated_finish,
            metadata=job.user_metadata,
            method={"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
            user_provided_suffix=job.suffix,
            progress=Progress(
                step=job.step,
                total_steps=job.total_steps,
                loss=job.loss,
                eval_loss=job.eval_loss,
                tokens_per_second=job.tokens_per_second,
                eta_seconds=job.eta_seconds,
            ),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            adapter_id=job.adapter_id,
            gpu_class=job.gpu_class,
            estimate=job.estimate,
            qlora=job.spec,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> EventObject:
        return cls(
            id=f"ftevent-{row.seq}",
            created_at=int(row.created_at.timestamp()),
            level=row.level,
            message=row.message,
            type=row.type,
            data=row.data,
        )


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    download_url: str

    @classmethod
    def of(cls, row: Checkpoint, job: Job) -> CheckpointObject:
        name = f"ft:{job.model}:{job.suffix or 'qlora'}:{job.id}:ckpt-step-{row.step}"
        return cls(
            id=row.id,
            created_at=int(row.created_at.timestamp()),
            fine_tuned_model_checkpoint=name,
            fine_tuning_job_id=job.id,
            step_number=row.step,
            metrics=row.metrics,
            download_url=f"/v1/fine_tuning/jobs/{job.id}/checkpoints/{row.id}/download",
        )


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class MetricsSeries(BaseModel):
    object: Literal["fine_tuning.job.metrics"] = "fine_tuning.job.metrics"
    job_id: str
    step: list[int]
    loss: list[float]
    lr: list[float]
    tokens_per_second: list[float]
    eval: list[dict[str, float]]


class AdapterObject(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created_at: int
    name: str
    base_model: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    qlora: dict[str, Any]
    download_url: str

    @classmethod
    def of(cls, row: Adapter) -> AdapterObject:
        return cls(
            id=row.id,
            created_at=int(row.created_at.timestamp()),
            name=row.name,
            base_model=row.base_model,
            fine_tuning_job_id=row.job_id,
            metrics=row.metrics,
            qlora=row.spec,
            download_url=f"/v1/adapters/{row.id}/download",
        )


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterObject]
    has_more: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


class EstimateObject(BaseModel):
    object: Literal["estimate"] = "estimate"
    model: str
    gpu_class: str | None
    queue: str | None
    fits: bool
    total_bytes: int
    parts: dict[str, int]
    trainable_params: int
    qlora: dict[str, Any]
