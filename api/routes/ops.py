"""The dashboard and its static files, liveness, readiness, and the folder store's signed
download URLs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from sqlalchemy import text

from api.deps import SettingsDep, StoreDep
from shared.errors import NotFound
from shared.storage import FolderStore, ObjectNotFound, StorageError

router = APIRouter(tags=["ops"])
log = logging.getLogger("api.ops")


STATIC = Path(__file__).resolve().parent.parent / "static"
# The dashboard runs only its own files: no inline script or style, no other origin, no frames.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ]
)
DASHBOARD_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) so an upgrade shows at once
}
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The dashboard (docs/dashboard.md): a static app that calls this API with the tenant's
    key, which it keeps in session storage and sends as a Bearer header."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=DASHBOARD_HEADERS)


@router.get("/static/{path:path}", include_in_schema=False)
def static_file(path: str) -> FileResponse:
    """The dashboard's scripts, styles and the vendored chart library (`make assets`)."""
    target = (STATIC / path).resolve()
    media_type = STATIC_TYPES.get(target.suffix)
    if (
        media_type is None
        or not target.is_relative_to(STATIC)
        or any(part.startswith(".") for part in Path(path).parts)
        or not target.is_file()
    ):
        raise NotFound("no such dashboard file")
    return FileResponse(target, media_type=media_type, headers=DASHBOARD_HEADERS)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_broker(url: str) -> None:
    if url.startswith(("redis://", "rediss://")):
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()


@router.get("/readyz")
def readyz(request: Request, settings: SettingsDep, store: StoreDep) -> JSONResponse:
    """Each dependency by name, `ok` or `error`; `failing` lists the names that are not ok.

    The answer is public, so it names no host, user, bucket or exception text: the reason
    goes to the log only.
    """
    checks: dict[str, str] = {}

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:
            log.warning("readiness: %s failed: %s: %s", name, type(exc).__name__, exc)
            checks[name] = "error"

    def db() -> None:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))

    run("database", db)
    run("object_store", store.check)
    run("broker", lambda: _check_broker(settings.broker_url))
    if settings.redis_url:
        run("redis", lambda: _check_broker(settings.redis_url or ""))
    failing = [name for name, state in checks.items() if state != "ok"]
    return JSONResponse(
        {"status": "not_ready" if failing else "ready", "checks": checks, "failing": failing},
        status_code=503 if failing else 200,
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
