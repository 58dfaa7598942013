"""What a job may start from besides a base model: one of its tenant's fine-tuned models, or a
checkpoint of one of its jobs, named as OpenAI names them.

* a fine-tuned model: `ft:{base}:{org}:{suffix}:{adapter id}` (an `Adapter` row);
* a checkpoint: `ft:{base}:{org}:{suffix}:{job id}:ckpt-step-{n}` (a `Checkpoint` row). OpenAI
  repeats the final model's id there; ours names the job, because a job's checkpoints exist
  before its adapter does and outlive the attempt that wrote them.

A job continuing from either trains on the same base with that adapter's weights as its start,
so the LoRA shape (`LORA_SHAPE_FIELDS`) is the source's: omitted, it is inherited; given and
different, the job is refused (`incompatible_adapter`). Another tenant's name is not found,
exactly like a name that never existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import NotFound
from shared.models import Adapter, Checkpoint, Job, Tenant
from shared.tenancy.service import tenant_slug

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# TrainSpec fields that decide the adapter's tensors (their names and shapes) and its scale.
LORA_SHAPE_FIELDS = (
    "rank",
    "alpha",
    "target_modules",
    "modules_to_save",
    "use_rslora",
    "use_dora",
)
_CHECKPOINT_NAME = re.compile(
    r"^ft:.+:(?P<job>ftjob-[a-z2-7]{24}):ckpt-step-(?P<step>[1-9]\d{0,8})$"
)


@dataclass(frozen=True)
class TrainedSource:
    """A tenant's fine-tuned model or checkpoint, as a job (or `models.retrieve`) sees it."""

    kind: Literal["model", "checkpoint"]
    name: str
    tenant_id: str
    base_model: str  # the registry name of the base it was trained on
    spec: dict[str, Any]  # the TrainSpec it was trained with
    weights_key: str  # object key of its adapter_model.safetensors
    created_at: datetime


def is_trained_name(name: str) -> bool:
    return name.startswith("ft:")


def checkpoint_name(job: Job, *, slug: str, step: int) -> str:
    """`ft:{base}:{org}:{suffix}:{job id}:ckpt-step-{n}`; the base is the registry name even
    for a job that continued from a fine-tuned model."""
    base = (job.spec or {}).get("base_model", job.model)
    return f"ft:{base}:{slug}:{job.suffix or ''}:{job.id}:ckpt-step-{int(step)}"


def _not_found(name: str) -> NotFound:
    return NotFound(f"no model named {name!r}", param="model", code="model_not_found")


def find_trained(session: Session, *, tenant_id: str, name: str) -> TrainedSource:
    """The tenant's fine-tuned model or checkpoint called `name`; 404 `model_not_found` when
    there is none (or it is another tenant's)."""
    match = _CHECKPOINT_NAME.match(name)
    if match is None:
        adapter = session.scalar(
            select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
        )
        if adapter is None:
            raise _not_found(name)
        return TrainedSource(
            kind="model",
            name=name,
            tenant_id=tenant_id,
            base_model=adapter.base_model,
            spec=dict(adapter.spec or {}),
            weights_key=adapter.storage_prefix.rstrip("/") + "/" + ADAPTER_WEIGHTS,
            created_at=adapter.created_at,
        )
    job = session.get(Job, match.group("job"))
    tenant = session.get(Tenant, tenant_id)
    if job is None or tenant is None or job.tenant_id != tenant_id:
        raise _not_found(name)
    step = int(match.group("step"))
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    )
    if row is None or checkpoint_name(job, slug=tenant_slug(tenant), step=step) != name:
        raise _not_found(name)
    return TrainedSource(
        kind="checkpoint",
        name=name,
        tenant_id=tenant_id,
        base_model=str((job.spec or {}).get("base_model", job.model)),
        spec=dict(job.spec or {}),
        weights_key=row.storage_prefix.rstrip("/") + "/" + ADAPTER_WEIGHTS,
        created_at=row.created_at,
    )
