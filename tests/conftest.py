"""Session fixtures shared by every test: moto's S3 server and a migrated Postgres database,
and the in-process API (`stack`) on the embedded default and on Postgres + S3. They are thin
wrappers over `tests.harness`, which the benchmarks use too."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from shared.config import Settings
from shared.db import _engine_for
from tests import services
from tests.harness import (
    ADMIN_KEY,
    SIGNING_SECRET,
    MotoS3,
    embedded_settings,
    migrate_database,
    moto_server,
    services_settings,
)

__all__ = ["ADMIN_KEY", "SIGNING_SECRET", "MotoS3", "Stack", "embedded_settings"]


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's standalone S3 server on a free loopback port: boto3 talks to it over HTTP."""
    with moto_server() as s3:
        yield s3


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for the session."""
    services.require("Postgres", services.postgres_available())
    with services.temporary_postgres_database() as url:
        migrate_database(Settings(database_url=url, var_dir=Path("/nonexistent")))
        yield url


@dataclass
class Stack:
    name: str
    settings: Settings
    client: TestClient

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def new_tenant(self, name: str = "acme") -> tuple[str, dict[str, str], str]:
        """Create a tenant and a key; returns (tenant_id, auth headers, key id)."""
        resp = self.client.post("/admin/tenants", json={"name": name}, headers=self.admin)
        assert resp.status_code == 201, resp.text
        tenant_id = resp.json()["id"]
        resp = self.client.post(f"/admin/tenants/{tenant_id}/keys", headers=self.admin)
        assert resp.status_code == 201, resp.text
        return tenant_id, {"Authorization": f"Bearer {resp.json()['key']}"}, resp.json()["id"]


@pytest.fixture(params=["embedded", "services"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """The API on the embedded default (SQLite + folder) and on Postgres + S3 over HTTP."""
    if request.param == "embedded":
        settings = embedded_settings(tmp_path / "var")
        migrate_database(settings)
    else:
        pg_url = request.getfixturevalue("postgres_url")
        settings = services_settings(tmp_path / "var", pg_url, request.getfixturevalue("moto_s3"))
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Stack(request.param, settings, client)
    if request.param == "embedded":
        _engine_for(settings.database_url).dispose()
