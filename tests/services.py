"""Discovery of the real services the integration tests use, and helpers to build stacks.

Postgres and Redis are used when reachable (CI sets REQUIRE_SERVICES=1, turning a missing
service into a failure instead of a skip). The S3 endpoint is always real: moto's standalone
server over HTTP, started by the test session.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest
from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1
        ):
            return True
    except OSError:
        return False


def postgres_available() -> bool:
    if not _reachable(PG_ADMIN_URL):
        return False
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def redis_available() -> bool:
    if not _reachable(REDIS_URL):
        return False
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    except Exception:
        return False


def require(service: str, available: bool) -> None:
    """Skip (laptop) or fail (CI) when a real service is missing."""
    if available:
        return
    message = (
        f"{service} is not reachable; integration test skipped (set REQUIRE_SERVICES=1 to fail)"
    )
    if REQUIRE_SERVICES:
        pytest.fail(f"REQUIRE_SERVICES=1 but {service} is not reachable")
    pytest.skip(message)


@contextmanager
def temporary_postgres_database() -> Iterator[str]:
    """A fresh database on the Postgres server, dropped afterwards; yields its URL."""
    name = f"qlora_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from shared.db import _engine_for

        _engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
