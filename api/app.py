"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, install_error_handlers
from api.event_hub import EventHub
from api.metrics import install_metrics
from api.routes import adapters, admin, files, jobs, ops, webhooks, workers
from shared.broker import JobPublisher, make_celery
from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.events import configure_publisher
from shared.storage import make_store

UPLOAD_ROUTES = frozenset({("POST", "/v1/files")})


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class RequestBoundsMiddleware:
    """Refuses a URL holding a NUL character (400 `invalid_request`: no id or cursor has one,
    and Postgres cannot even compare one) and caps request bodies at
    `settings.max_json_body_bytes` (413 `request_too_large`).

    Pure ASGI: it counts the bytes as the app receives them, so a chunked body (no
    Content-Length) is stopped as soon as it crosses the limit, and nothing is buffered. A
    multipart post to an upload route is left to `api.upload`, which has its own limits. The
    limit is read per request, so a changed setting applies at once.
    """

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").lower()
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            response = error_response(
                400, "invalid_request", "the URL must not contain NUL characters", None
            )
            await response(scope, receive, send)
            return
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "").lower()
        if (scope["method"], scope["path"]) in UPLOAD_ROUTES and content_type.startswith(
            "multipart/form-data"
        ):
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_json_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = error_response(413, "request_too_large", BodyTooLarge(limit).detail, None)
        await response(scope, receive, send)


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
    app.state.publish_job = JobPublisher(make_celery(settings))
    install_error_handlers(app)
    app.add_middleware(RequestBoundsMiddleware, settings=settings)
    install_metrics(app)  # outermost: refused requests are counted too
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(workers.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    app.include_router(adapters.router)
    app.include_router(webhooks.router)
    return app
