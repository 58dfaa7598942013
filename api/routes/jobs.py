"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning jobs API, plus live events over SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.archive import stream_prefix_as_tar
from api.deps import CurrentTenant, SessionDep, StoreDep
from shared.events import channel
from shared.jobs import idempotency, leases, service
from shared.jobs.schemas import (
    CheckpointList,
    CheckpointObject,
    EventList,
    EventObject,
    JobCreate,
    JobList,
    JobObject,
    MetricsSeries,
)
from shared.jobs.states import TERMINAL, JobStatus
from shared.models import Job, OutboxMessage

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
log = logging.getLogger("api.jobs")
KEEPALIVE_S = 15.0
POLL_S = 0.5


def relay_outbox(request: Request, outbox_id: int) -> None:
    """Publish right after commit; if the broker is down the sweeper publishes it later."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions.begin() as session:
        row = session.get(OutboxMessage, outbox_id)
        if row is not None and row.sent_at is None:
            sent = leases.publish_outbox(session, [row], request.app.state.publish_job)
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
            job, outbox = service.create_job(session, tenant=tenant, body=body, idempotency_key=key)
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
    relay_outbox(request, outbox_id)
    return obj


@router.get("", response_model=JobList)
def list_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    rows, has_more = service.list_jobs(session, tenant_id=tenant.id, after=after, limit=limit)
    return JobList(data=[JobObject.of(r) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobObject)
def get_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobObject:
    return JobObject.of(service.get_job(session, tenant_id=tenant.id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, tenant: CurrentTenant, session: SessionDep) -> JobObject:
    return JobObject.of(service.cancel_job(session, tenant_id=tenant.id, job_id=job_id))


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
        start = service.parse_event_id(last_event_id) if last_event_id else 0
        return StreamingResponse(
            _event_stream(request, job.id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows, has_more = service.list_events(session, job=job, after=after, limit=limit)
    return EventList(data=[EventObject.of(r) for r in rows], has_more=has_more)


def _sse(row: Any) -> str:
    obj = EventObject.of(row)
    return f"id: {row.seq}\nevent: {row.type}\ndata: {obj.model_dump_json()}\n\n"


async def _event_stream(request: Request, job_id: str, after: int) -> AsyncIterator[str]:
    """Stored events after `after`, then live ones; ends after the job's final event.

    The database is the record: a pub/sub message only says "look again", so reconnecting
    with Last-Event-ID resumes exactly after the last event the client saw.
    """
    sessions: sessionmaker[Session] = request.app.state.sessions
    redis_url: str | None = request.app.state.settings.redis_url

    def fetch(seq: int) -> tuple[list[Any], str | None]:
        with sessions() as session:
            status = session.get(Job, job_id)
            current = status.status if status is not None else None  # status first, then rows
            return service.events_since(session, job_id=job_id, seq=seq), current

    pubsub = None
    if redis_url:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(channel(job_id))
        except Exception as exc:  # Redis down: fall back to polling the table
            log.warning("SSE falls back to polling: %s", exc)
            pubsub = None
    try:
        idle = 0.0
        while not await request.is_disconnected():
            rows, status = await run_in_threadpool(fetch, after)
            for row in rows:
                yield _sse(row)
                after = row.seq
            if rows:
                idle = 0.0
                continue
            if status is None or JobStatus(status) in TERMINAL:
                yield f"event: done\ndata: {json.dumps({'status': status})}\n\n"
                return
            waited = KEEPALIVE_S if pubsub is not None else POLL_S
            if pubsub is not None:
                try:
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=KEEPALIVE_S)
                    waited = 0.0
                except Exception:
                    pubsub = None
            else:
                await asyncio.sleep(POLL_S)
            idle += waited
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield ": keepalive\n\n"
    finally:
        if pubsub is not None:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


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
    data = [CheckpointObject.of(r, job) for r in rows]
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
