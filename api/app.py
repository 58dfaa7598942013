"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.event_hub import EventHub
from api.metrics import install_metrics
from api.routes import adapters, admin, files, jobs, ops
from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.events import configure_publisher
from shared.storage import make_store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await app.state.event_hub.close()

    app = FastAPI(
        lifespan=lifespan,
        title="QLoRA fine-tuning service",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning API backed by NF4 QLoRA workers.",
    )
    app.state.settings = settings
    app.state.sessions = session_factory(settings)
    app.state.store = make_store(settings)
    configure_publisher(settings.redis_url)
    app.state.event_hub = EventHub(app.state.sessions, settings.redis_url)
    from worker.celery_app import JobPublisher, make_celery

    app.state.publish_job = JobPublisher(make_celery(settings))
    install_error_handlers(app)
    install_metrics(app)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(adapters.router)
    return app
