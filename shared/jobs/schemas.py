"""Request and response shapes of the jobs API (OpenAI fine-tuning objects plus `qlora`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.errors import Invalid
from shared.jobs.sources import checkpoint_name
from shared.models import Adapter, Checkpoint, Job, JobEvent

Auto = Literal["auto"]

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def _unstorable(value: str) -> str | None:
    """Why a string cannot be stored as text (Postgres refuses NUL, UTF-8 lone surrogates)."""
    if "\x00" in value:
        return "must not contain NUL characters"
    if any("\ud800" <= c <= "\udfff" for c in value):
        return "must not contain unpaired surrogate characters"
    return None


def _storable(value: str) -> str:
    reason = _unstorable(value)
    if reason is not None:
        raise ValueError(reason)
    return value


# A string that goes into the database as it is: no NUL, no lone surrogates.
TextStr = Annotated[str, AfterValidator(_storable)]


class Hyperparameters(BaseModel):
    # Both bounds here, so that a refusal names the field as the request spelt it
    # (`hyperparameters.n_epochs`, `method.supervised.hyperparameters.n_epochs`), not the
    # TrainSpec field it becomes; NaN and infinities never pass.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_epochs: Annotated[int, Field(ge=1, le=100)] | Auto = Field(
        "auto", description="Epochs; 'auto' uses the qlora default."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = Field(
        "auto", description="Examples per micro-batch."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=5000)] | Auto = Field(
        "auto", description="Multiplies the base QLoRA learning rate (2e-4)."
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto", description="DPO's beta (how far from the reference); 'auto' is 0.1."
    )


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = Field(
        description="supervised (chat/prompt rows) or dpo (preference rows)."
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is {self.type}")
        return self


def method_object(job: Job) -> dict[str, Any]:
    """The job's `method` as OpenAI reports it: its type and that type's hyperparameters."""
    kind = (job.spec or {}).get("method", "supervised")
    return {"type": kind, kind: {"hyperparameters": job.hyperparameters}}


class WandbSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: TextStr = Field(min_length=1, max_length=128, description="W&B project.")
    name: TextStr | None = Field(None, max_length=128, description="Run name (default: job id).")
    entity: TextStr | None = Field(None, max_length=128, description="W&B team or user.")
    tags: list[Annotated[TextStr, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=50, description="Run tags (the job id is always added)."
    )


class MlflowSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiment: TextStr | None = Field(
        None, min_length=1, max_length=256, description="Experiment name (default: qlora)."
    )
    run_name: TextStr | None = Field(
        None, min_length=1, max_length=256, description="Run name (default: job id)."
    )


class Integration(BaseModel):
    """One `integrations` entry: `{"type": "wandb", "wandb": {...}}` or
    `{"type": "mlflow", "mlflow": {...}}` (the block may be omitted for MLflow)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb", "mlflow"]
    wandb: WandbSettings | None = None
    mlflow: MlflowSettings | None = None

    @model_validator(mode="after")
    def _block_matches_type(self) -> Integration:
        other = "mlflow" if self.type == "wandb" else "wandb"
        if getattr(self, other) is not None:
            raise ValueError(f"{other} is given but type is {self.type}")
        if self.type == "wandb" and self.wandb is None:
            raise ValueError("wandb: give the W&B settings, at least a project")
        if self.type == "mlflow" and self.mlflow is None:
            self.mlflow = MlflowSettings()
        return self

    def stored(self) -> dict[str, Any]:
        """As stored and reported: the type and its own block only."""
        block = self.wandb if self.type == "wandb" else self.mlflow
        assert block is not None
        return {"type": self.type, self.type: block.model_dump(mode="json")}


class JobCreate(BaseModel):
    """`POST /v1/fine_tuning/jobs`. `qlora` takes any `TrainSpec` field but `base_model`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    model: TextStr = Field(min_length=1, max_length=200)
    training_file: TextStr = Field(min_length=1, max_length=64)
    validation_file: TextStr | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")
    seed: int | None = Field(None, ge=0, lt=2**32)
    metadata: dict[str, str] | None = Field(
        None,
        description=f"Up to {MAX_METADATA_PAIRS} string pairs: keys of at most "
        f"{MAX_METADATA_KEY_CHARS} characters, values of at most {MAX_METADATA_VALUE_CHARS}.",
    )
    integrations: list[Integration] | None = Field(
        None,
        max_length=2,
        description="Experiment tracking: at most one `wandb` and one `mlflow` entry; each "
        "needs the deployment to configure it (400 `integration_not_configured`).",
    )
    qlora: dict[str, Any] | None = Field(
        None, max_length=64, description="TrainSpec fields (the extension)."
    )

    @field_validator("integrations")
    @classmethod
    def _one_per_type(cls, value: list[Integration] | None) -> list[Integration] | None:
        kinds = [item.type for item in value or []]
        if len(set(kinds)) != len(kinds):
            raise PydanticCustomError("invalid_value", "give each integration type once")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _check_metadata(cls, value: Any) -> Any:
        """All of metadata's problems are `invalid_metadata` on param `metadata`."""
        if value is None:
            return value
        if not isinstance(value, dict):
            raise PydanticCustomError("invalid_metadata", "must be an object of string pairs")
        if len(value) > MAX_METADATA_PAIRS:
            raise PydanticCustomError(
                "invalid_metadata", f"at most {MAX_METADATA_PAIRS} pairs, got {len(value)}"
            )
        for key, item in value.items():
            shown = repr(key[:MAX_METADATA_KEY_CHARS]) if isinstance(key, str) else "a key"
            if not isinstance(key, str) or not isinstance(item, str):
                raise PydanticCustomError("invalid_metadata", f"{shown}: values must be strings")
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise PydanticCustomError(
                    "invalid_metadata",
                    f"key {shown}... is longer than {MAX_METADATA_KEY_CHARS} characters",
                )
            if len(item) > MAX_METADATA_VALUE_CHARS:
                raise PydanticCustomError(
                    "invalid_metadata",
                    f"the value of {shown} is longer than {MAX_METADATA_VALUE_CHARS} characters",
                )
            reason = _unstorable(key) or _unstorable(item)
            if reason is not None:
                raise PydanticCustomError("invalid_metadata", f"{shown}: keys and values {reason}")
        return value


_METADATA_PARAM = re.compile(r"^metadata\[([^\[\]]*)\]$")


@dataclass(frozen=True)
class MetadataFilter:
    """`GET /v1/fine_tuning/jobs`' metadata filter: every pair must match (AND), or, for the
    literal `metadata=null`, only jobs without metadata. Empty: no filter."""

    pairs: dict[str, str] = field(default_factory=dict)
    only_null: bool = False

    @classmethod
    def from_query(cls, items: Iterable[tuple[str, str]]) -> MetadataFilter:
        """Read `metadata[k]=v` pairs (as the OpenAI SDK sends a dict) and `metadata=null`
        from a query string; a malformed one is a 400 naming the parameter."""
        pairs: dict[str, str] = {}
        only_null = False
        for name, value in items:
            if name == "metadata":
                if value != "null":
                    raise Invalid(
                        "metadata: filter with metadata[key]=value, or metadata=null for jobs "
                        "without metadata",
                        param="metadata",
                    )
                only_null = True
                continue
            if not name.startswith("metadata["):
                continue
            # The name, cut to the longest a valid one can be (a whole valid name fits).
            param = name[: len("metadata[]") + MAX_METADATA_KEY_CHARS]
            match = _METADATA_PARAM.match(name)
            if match is None or not match.group(1):
                raise Invalid(
                    f"{param}: write a metadata filter as metadata[key]=value, with a key of "
                    f"1 to {MAX_METADATA_KEY_CHARS} characters and no brackets",
                    param=param,
                )
            key = match.group(1)
            if len(key) > MAX_METADATA_KEY_CHARS:
                raise Invalid(
                    f"{param}...: metadata keys are at most {MAX_METADATA_KEY_CHARS} characters",
                    param=param,
                )
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise Invalid(
                    f"{param}: metadata values are at most {MAX_METADATA_VALUE_CHARS} characters",
                    param=param,
                )
            reason = _unstorable(key) or _unstorable(value)
            if reason is not None:
                raise Invalid(f"{param}: keys and values {reason}", param=param)
            if key in pairs:
                raise Invalid(f"{param}: the key is given twice", param=param)
            pairs[key] = value
        if only_null and pairs:
            raise Invalid(
                "metadata: metadata=null cannot be combined with metadata[key]=value",
                param="metadata",
            )
        return cls(pairs=pairs, only_null=only_null)


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
    # OpenAI's SDK reads `integrations` as W&B objects only: other types (MLflow) are
    # reported, as given, in `other_integrations`.
    integrations: list[Any] = []
    other_integrations: list[Any] = []
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
            result_files=list(job.result_files or []),
            seed=job.seed,
            status=job.status,
            trained_tokens=job.trained_tokens,
            training_file=job.training_file,
            validation_file=job.validation_file,
            estimated_finish=estimated_finish,
            integrations=[i for i in job.integrations or [] if i.get("type") == "wandb"],
            other_integrations=[i for i in job.integrations or [] if i.get("type") != "wandb"],
            metadata=job.user_metadata,
            method=method_object(job),
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
    def of(cls, row: Checkpoint, job: Job, *, slug: str) -> CheckpointObject:
        """`slug`: the tenant's organization segment (`tenant_slug`) for the model name."""
        name = checkpoint_name(job, slug=slug, step=row.step)
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
