"""Liveness, readiness, and the folder store's signed download URLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy import text

from api.deps import SettingsDep, StoreDep
from shared.errors import NotFound
from shared.storage import FolderStore, ObjectNotFound, StorageError

router = APIRouter(tags=["ops"])


DASHBOARD = Path(__file__).resolve().parent.parent / "static" / "dashboard.html"


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The live dashboard: a static page that calls this API with the tenant's key."""
    return FileResponse(DASHBOARD, media_type="text/html")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_broker(url: str) -> None:
    if url.startswith(("redis://", "rediss://")):
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()


@router.get("/readyz")
def readyz(request: Request, settings: SettingsDep, store: StoreDep) -> JSONResponse:
    checks: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]

    def db() -> None:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))

    run("database", db)
    run("storage", store.check)
    run("broker", lambda: _check_broker(settings.broker_url))
    if settings.redis_url:
        run("redis", lambda: _check_broker(settings.redis_url or ""))
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status_code=200 if ready else 503,
    )


@router.get("/v1/storage/{key:path}", include_in_schema=False)
def signed_download(key: str, expires: int, signature: str, store: StoreDep) -> StreamingResponse:
    """Serves a folder-store object to the holder of a URL from `presigned_get`."""
    if not isinstance(store, FolderStore):
        raise NotFound("signed URLs are served by the object store itself")
    try:
        if not store.verify(key, expires, signature):
            raise NotFound("the link is invalid or has expired", code="link_expired")
        size = store.size(key)
    except (StorageError, ObjectNotFound) as exc:
        raise NotFound("the link is invalid or has expired", code="link_expired") from exc
    return StreamingResponse(
        store.iter_chunks(key),
        media_type="application/octet-stream",
        headers={"content-length": str(size)},
    )
