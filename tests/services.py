"""The real services the integration tests need, for pytest: skip (laptop) or fail (CI) when one
is missing. Discovery, temporary databases and ports live in `tests.harness`; the names are
re-exported here for the tests that import them from this module."""

from __future__ import annotations

import pytest

from tests.harness.backends import (
    PG_ADMIN_URL,
    REDIS_URL,
    REQUIRE_SERVICES,
    postgres_available,
    redis_available,
    temporary_postgres_database,
)
from tests.harness.processes import free_port

__all__ = [
    "PG_ADMIN_URL",
    "REDIS_URL",
    "REQUIRE_SERVICES",
    "free_port",
    "postgres_available",
    "redis_available",
    "require",
    "temporary_postgres_database",
]


def require(service: str, available: bool) -> None:
    """Skip (laptop) or fail (CI, `REQUIRE_SERVICES=1`) when a real service is missing."""
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"REQUIRE_SERVICES=1 but {service} is not reachable")
    pytest.skip(
        f"{service} is not reachable; integration test skipped (set REQUIRE_SERVICES=1 to fail)"
    )
