"""One settings object for every process (API, worker, beat, CLI), read from the environment.

The embedded default (no variables set) runs on SQLite, a local folder and a SQLite-backed
Celery transport under `./var/`; production points the same code at Postgres, Redis and S3.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "changethis", "change-me", "secret", "admin", "password", "test", "dev"}
)
GIB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses placeholder secrets and unset keys."
    )
    var_dir: Path = Field(Path("var"), description="Embedded default's state directory.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in var_dir.")
    broker_url: str = Field("", description="Celery broker; default SQLite kombu transport.")
    redis_url: str | None = Field(None, description="Redis for live events; None polls the DB.")
    storage_url: str = Field("", description="file:///path or s3://bucket; default var/objects.")
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"
    admin_api_key: str | None = Field(None, description="Bearer key of the /admin API.")
    signing_secret: str | None = Field(
        None, description="HMAC key for signed download URLs of the folder store."
    )
    max_upload_bytes: int = Field(GIB, gt=0, description="Largest accepted upload, in bytes.")
    max_line_bytes: int = Field(1024 * 1024, gt=0, description="Longest accepted JSONL line.")
    public_base_url: str = Field("", description="Base of absolute URLs the API hands out.")
    worker_queues: str = Field("cpu", description="Comma-separated GPU-class queues to consume.")
    models_dir: Path | None = Field(None, description="Where generated local base models live.")
    lease_seconds: float = Field(60.0, gt=0, description="A worker's hold on a running job.")
    sweep_interval_seconds: float = Field(10.0, gt=0, description="How often the beat sweeps.")
    progress_interval_seconds: float = Field(
        2.0, ge=0, description="Least time between progress writes (lease renewals) of a job."
    )
    register_tiny_model: bool = Field(
        True, description="Prestart builds and registers the local `tiny-llama` base model."
    )

    @model_validator(mode="after")
    def _fill_defaults_and_refuse_placeholders(self) -> Settings:
        var = self.var_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{var / 'qlora.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{var / 'broker.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{var / 'objects'}"
        if self.models_dir is None:
            self.models_dir = var / "models"
        if self.environment == "production":
            for name in ("admin_api_key", "signing_secret"):
                value = getattr(self, name)
                if name == "signing_secret" and not self.storage_url.startswith("file://"):
                    continue
                if value is None or value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < 24:
                    raise ValueError(
                        f"{name.upper()} must be set to a real secret (24+ characters) "
                        "when ENVIRONMENT=production"
                    )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def storage_scheme(self) -> str:
        return urlparse(self.storage_url).scheme

    @property
    def queues(self) -> list[str]:
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()]


def ensure_local_secret(settings: Settings, name: str) -> tuple[str, bool]:
    """Read or create a secret kept in `var_dir/<name>` (mode 0600); returns (value, created).

    Only used on the embedded default, so a laptop start needs no configuration.
    """
    path = settings.var_dir.resolve() / name
    if path.exists():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = path.open("x")
    try:
        path.chmod(0o600)
        fd.write(value + "\n")
    finally:
        fd.close()
    return value, True


def with_local_secrets(settings: Settings) -> Settings:
    """On the embedded default, fill unset secrets from (or into) files under `var_dir`."""
    if settings.environment != "development":
        return settings
    updates: dict[str, str] = {}
    if not settings.admin_api_key:
        updates["admin_api_key"] = ensure_local_secret(settings, "admin_api_key")[0]
    if not settings.signing_secret:
        updates["signing_secret"] = ensure_local_secret(settings, "signing_secret")[0]
    return settings.model_copy(update=updates) if updates else settings


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return with_local_secrets(Settings())
