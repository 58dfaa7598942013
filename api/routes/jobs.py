"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs API, plus live events over SSE."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from api.archive import stream_prefix_as_tar
from api.deps import CurrentTenant, SessionDep, StoreDep
from api.event_hub import EventHub, StreamEnd, StreamInterrupted
from api.event_stream import EventStreamResponse
from shared.jobs import idempotency, outbox, retention, service
from shared.jobs.schemas import (
    CheckpointList,
    CheckpointObject,
    EventList,
    EventObject,
    JobCreate,
    JobList,
    JobObject,
    MetadataFilter,
    MetricsSeries,
)
from shared.models import OutboxMessage
from shared.tenancy.service import tenant_slug

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
log = logging.getLogger("api.jobs")


def relay_outbox(request: Request, outbox_id: int) -> None:
    """Publish right after commit; if the broker is down the sweeper publishes it later."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions.begin() as session:
        row = session.get(OutboxMessage, outbox_id)
        if row is not None and row.sent_at is None:
            sent = outbox.publish(session, [row], request.app.state.publish_job)
            if not sent:
                log.warning("broker unavailable; job %s stays in the outbox", row.job_id)


@router.post("", response_model=JobObject)
def create_job(
    request: Request,
    body: JobCreate,
    tenant: CurrentTenant,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Any:
    sessions: sessionmaker[Session] = request.app.state.sessions
    key = idempotency.check_key(idempotency_key) if idempotency_key is not None else None
    if key is not None:
        digest = idempotency.request_hash(body.model_dump(mode="json"))
        stored = idempotency.begin(sessions, tenant_id=tenant.id, key=key, digest=digest)
        if stored is not None:
            return JSONResponse(
                stored.body, status_code=stored.status, headers={"Idempotent-Replayed": "true"}
            )
    try:
        with sessions.begin() as session:
            job, outbox = service.create_job(
                session,
                tenant=tenant,
                body=body,
                idempotency_key=key,
                settings=request.app.state.settings,
            )
            obj = JobObject.of(job)
            if key is not None:
                idempotency.complete(
                    session,
                    tenant_id=tenant.id,
                    key=key,
                    status=200,
                    body=obj.model_dump(mode="json"),
                )
            outbox_id = outbox.id
    except BaseException:
        if key is not None:
            idempotency.abandon(sessions, tenant_id=tenant.id, key=key)
        raise
    try:
        relay_outbox(request, outbox_id)
    except Exception:  # committed: the answer is the job; the sweeper relays the message
        log.warning(
            "relay after commit failed; the sweeper publishes job %s", obj.id, exc_info=True
        )
    return obj


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """`metadata[key]=value` (any number, AND-ed) or `metadata=null` filter the list."""
    metadata = MetadataFilter.from_query(request.query_params.multi_items())
    rows, has_more = service.list_jobs(
        session, tenant_id=tenant.id, after=after, limit=limit, metadata=metadata
    )
    return JobList(data=[JobObject.of(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobObject)
def get_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobObject:
    return JobObject.of(service.get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobObject:
    return JobObject.of(service.cancel_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/pause", response_model=JobObject)
def pause_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobObject:
    return JobObject.of(service.pause_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/resume", response_model=JobObject)
def resume_job(request: Request, job_id: str, tenant: CurrentTenant, session: SessionDep) -> Any:
    job, row = service.resume_job(session, tenant_id=tenant.id, job_id=job_id)
    obj = JobObject.of(job)
    session.commit()
    if row is not None:
        try:
            relay_outbox(request, row.id)
        except Exception:  # committed: the sweeper relays the message
            log.warning("relay after resume failed; the sweeper publishes job %s", job.id)
    return obj


class JobDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    deleted: bool = True


@router.delete("/{job_id}", response_model=JobDeleted)
def delete_job(
    request: Request, job_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> JobDeleted:
    """An extension (OpenAI has none): a finished job goes with its adapter and checkpoints."""
    job = service.delete_job(session, tenant_id=tenant.id, job_id=job_id)
    session.commit()
    # Post-commit: the answer is the committed delete; the sweeper deletes what the store
    # refuses now (the prefixes stay in `object_deletions`).
    try:
        retention.drain_deletions(request.app.state.sessions, store, limit=20)
    except Exception as exc:
        log.warning("job %s: object deletion deferred (%s)", job.id, type(exc).__name__)
    return JobDeleted(id=job.id)


@router.get("/{job_id}/events", response_model=EventList)
def list_events(
    request: Request,
    job_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Any:
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        start = service.parse_event_id(last_event_id, param="Last-Event-ID") if last_event_id else 0
        hub: EventHub = request.app.state.event_hub
        limit = request.app.state.settings.max_streams_per_tenant
        release = hub.streams.take(tenant.id, limit=limit)  # 429 `too_many_streams` above it
        return EventStreamResponse(_event_stream(hub, job.id, start), release=release)
    rows, has_more = service.list_events(session, job=job, after=after, limit=limit)
    return EventList(data=[EventObject.of(r) for r in rows], has_more=has_more)


def _sse(row: Any) -> str:
    obj = EventObject.of(row)
    return f"id: {row.seq}\nevent: {row.type}\ndata: {obj.model_dump_json()}\n\n"


async def _event_stream(hub: EventHub, job_id: str, after: int) -> AsyncIterator[str]:
    """Stored events after `after` (paged), then live ones; after the job's final event,
    `event: done` with its status.

    The database is the record: reconnecting with Last-Event-ID resumes exactly after the
    last event the client saw. `api.event_hub` shares one reader among all watchers of a job.
    """
    try:
        async for item in hub.watch(job_id, after):
            if item is None:
                yield ": keepalive\n\n"
            elif isinstance(item, StreamEnd):
                yield f"event: done\ndata: {json.dumps({'status': item.status})}\n\n"
            else:
                yield _sse(item)
    except StreamInterrupted:
        return  # no `done`: the client reconnects with Last-Event-ID and loses nothing


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str,
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointList:
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    rows, has_more = service.list_checkpoints(session, job=job, after=after, limit=limit)
    slug = tenant_slug(tenant)
    data = [CheckpointObject.of(r, job, slug=slug) for r in rows]
    return CheckpointList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}/checkpoints/{checkpoint_id}/download")
def download_checkpoint(
    job_id: str, checkpoint_id: str, tenant: CurrentTenant, session: SessionDep, store: StoreDep
) -> Response:
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    row = service.get_checkpoint(session, job=job, checkpoint_id=checkpoint_id)
    return stream_prefix_as_tar(store, row.storage_prefix, f"{job.id}-step-{row.step}")


@router.get("/{job_id}/metrics", response_model=MetricsSeries)
def job_metrics(job_id: str, tenant: CurrentTenant, session: SessionDep) -> MetricsSeries:
    job = service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    return MetricsSeries(job_id=job.id, **service.metrics_series(session, job=job))
