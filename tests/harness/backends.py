"""The real Postgres and Redis a stack runs on: where they are, whether they answer, a temporary
database per stack, the migrations, and a Redis database leased to one stack at a time.

Postgres and Redis are used when reachable; `REQUIRE_SERVICES=1` (CI) makes a missing one a
failure instead of a skip (see `tests/services.py`).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlparse

import redis
from sqlalchemy import create_engine, text

from shared.config import Settings
from tests.harness.processes import StackError

PG_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"
LEASE_KEY = "qlora-harness:lease"
LEASE_SECONDS = 6 * 3600  # a crashed run's database comes free after this long


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
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    except Exception:
        return False


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

        _engine_for(url).dispose()
        _engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def migrate_database(settings: Settings) -> None:
    """`alembic upgrade head` on the settings' database, as `python -m api.prestart` does."""
    from api.prestart import migrate

    migrate(settings)


def redis_db_url(db: int) -> str:
    """The URL of database `db` on the test Redis server."""
    return f"{REDIS_URL.rsplit('/', 1)[0]}/{db}"


@contextmanager
def leased_redis_db(candidates: Sequence[int]) -> Iterator[str]:
    """The first of `candidates` that no other stack holds, flushed, leased for the block (a key
    set with NX in that database) and flushed again on the way out; yields its URL."""
    token = f"{os.getpid()}-{uuid.uuid4().hex}"
    for db in candidates:
        url = redis_db_url(db)
        client = redis.Redis.from_url(url)
        if not client.set(LEASE_KEY, token, nx=True, ex=LEASE_SECONDS):
            client.close()
            continue
        for key in client.scan_iter(count=1000):
            if key != LEASE_KEY.encode():
                client.delete(key)
        try:
            yield url
        finally:
            client.flushdb()
            client.close()
        return
    raise StackError(f"every Redis database of {list(candidates)} is leased by another stack")
