from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import boto3
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.prestart import migrate
from shared.config import Settings
from shared.db import _engine_for
from tests import services

ADMIN_KEY = "test-admin-key-0123456789abcdef"
SIGNING_SECRET = "test-signing-secret-0123456789abcdef"


@dataclass
class MotoS3:
    endpoint_url: str
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        import uuid

        name = f"qlora-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's standalone S3 server on a free loopback port: boto3 talks to it over HTTP."""
    from moto.server import ThreadedMotoServer

    port = services.free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoS3(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for the session."""
    services.require("Postgres", services.postgres_available())
    with services.temporary_postgres_database() as url:
        migrate(Settings(database_url=url, var_dir=Path("/nonexistent")))
        yield url


def embedded_settings(var_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "var_dir": var_dir,
        "admin_api_key": ADMIN_KEY,
        "signing_secret": SIGNING_SECRET,
        "public_base_url": "http://testserver",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def services_settings(var_dir: Path, pg_url: str, s3: MotoS3, **overrides: object) -> Settings:
    return embedded_settings(
        var_dir,
        database_url=pg_url,
        storage_url=f"s3://{s3.new_bucket()}",
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key_id=s3.access_key,
        s3_secret_access_key=s3.secret_key,
        **overrides,
    )


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
        migrate(settings)
    else:
        pg_url = request.getfixturevalue("postgres_url")
        settings = services_settings(tmp_path / "var", pg_url, request.getfixturevalue("moto_s3"))
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Stack(request.param, settings, client)
    if request.param == "embedded":
        _engine_for(settings.database_url).dispose()
