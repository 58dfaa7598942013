"""Prometheus metrics: requests by route and status, latency, upload bytes, jobs by status, and
per GPU-class queue its depth, its oldest queued job's age and the live workers serving it."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import workers
from shared.config import Settings
from shared.jobs.states import JobStatus
from shared.models import Job, OutboxMessage

REGISTRY = CollectorRegistry(auto_describe=True)
REQUESTS = Counter(
    "qlora_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "qlora_http_request_duration_seconds",
    "HTTP request latency until the response starts",
    ["method", "route"],
    registry=REGISTRY,
)
UPLOAD_BYTES = Counter("qlora_upload_bytes", "Bytes received in uploads", registry=REGISTRY)


class MetricsMiddleware:
    """Pure ASGI (no body buffering), so streamed uploads and SSE pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()


def job_gauges(sessions: sessionmaker[Session]) -> bytes:
    """Jobs by status and the unsent outbox, read from the database at scrape time (the
    database, not this process, knows the whole fleet's state)."""
    registry = CollectorRegistry()
    jobs = Gauge("qlora_jobs", "Fine-tuning jobs by status", ["status"], registry=registry)
    unsent = Gauge("qlora_outbox_unsent", "Job messages not yet published", registry=registry)
    with sessions() as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        pending = session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
        )
    for status in JobStatus:
        jobs.labels(status.value).set(counts.get(status.value, 0))
    unsent.set(pending or 0)
    return generate_latest(registry)


def queue_gauges(sessions: sessionmaker[Session], settings: Settings) -> bytes:
    """Per queue (GPU class): queued jobs, seconds the longest-waiting one has waited since it
    was last queued, live workers consuming it; from the database at scrape time."""
    registry = CollectorRegistry()
    depth = Gauge(
        "qlora_queue_depth", "Queued jobs per GPU-class queue", ["queue"], registry=registry
    )
    oldest = Gauge(
        "qlora_queue_oldest_age_seconds",
        "How long the longest-waiting queued job has waited, per queue (0 when empty)",
        ["queue"],
        registry=registry,
    )
    live = Gauge(
        "qlora_queue_live_workers",
        "Live workers consuming each queue",
        ["queue"],
        registry=registry,
    )
    with sessions() as session:
        stats = workers.queue_stats(session, settings)
    for row in stats:
        depth.labels(row.queue).set(row.depth)
        oldest.labels(row.queue).set(row.oldest_queued_seconds)
        live.labels(row.queue).set(row.live_workers)
    return generate_latest(registry)


def install_metrics(app: FastAPI) -> None:
    app.add_middleware(MetricsMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        sessions = request.app.state.sessions
        body = (
            generate_latest(REGISTRY)
            + job_gauges(sessions)
            + queue_gauges(sessions, request.app.state.settings)
        )
        return Response(body, media_type=CONTENT_TYPE_LATEST)
