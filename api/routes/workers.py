"""`GET /admin/workers`: the worker fleet, live or stale; admin key only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import AdminDep, SessionDep, SettingsDep
from shared import workers
from shared.models import Worker, utcnow


class WorkerObject(BaseModel):
    id: str = Field(description="The worker's lease-owner name (host:pid).")
    object: Literal["worker"] = "worker"
    hostname: str
    queues: list[str] = Field(description="The GPU-class queues it consumes.")
    device: str = Field(description="`cpu` or `cuda:0 <name>`.")
    memory_bytes: int = Field(description="Memory it declared: VRAM on a GPU, RAM on a CPU.")
    started_at: int
    heartbeat_at: int
    seconds_since_heartbeat: float
    live: bool = Field(description="Heard of within WORKER_STALE_SECONDS.")
    current_job_id: str | None

    @classmethod
    def of(cls, row: Worker, *, live: bool) -> WorkerObject:
        heartbeat_at = workers.aware(row.heartbeat_at)
        return cls(
            id=row.id,
            hostname=row.hostname,
            queues=[str(q) for q in row.queues or []],
            device=row.device,
            memory_bytes=row.memory_bytes,
            started_at=int(workers.aware(row.started_at).timestamp()),
            heartbeat_at=int(heartbeat_at.timestamp()),
            seconds_since_heartbeat=round((utcnow() - heartbeat_at).total_seconds(), 3),
            live=live,
            current_job_id=row.current_job_id,
        )


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerObject]
    has_more: bool = False


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@router.get("/workers", response_model=WorkerList)
def list_workers(session: SessionDep, settings: SettingsDep) -> WorkerList:
    now = utcnow()
    return WorkerList(
        data=[
            WorkerObject.of(row, live=workers.is_live(row, settings, now))
            for row in workers.list_workers(session)
        ]
    )
