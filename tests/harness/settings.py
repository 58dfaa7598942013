"""Settings of the two stacks: the embedded default (SQLite + a folder) and the services one
(Postgres + Redis + S3), as `Settings` objects for this process and as the environment of the
stack's child processes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from shared.config import Settings
from tests.harness.s3 import MotoS3

ADMIN_KEY = "test-admin-key-0123456789abcdef"
SIGNING_SECRET = "test-signing-secret-0123456789abcdef"
# What every child process of a services stack gets besides its addresses.
CHILD_DEFAULTS = {
    "ENVIRONMENT": "development",
    "ADMIN_API_KEY": ADMIN_KEY,
    "SIGNING_SECRET": SIGNING_SECRET,
    "WORKER_QUEUES": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


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


def services_env(
    *, var_dir: Path, database_url: str, redis_url: str, s3: MotoS3, bucket: str
) -> dict[str, str]:
    """The settings' environment variables of a services stack's processes."""
    return {
        **CHILD_DEFAULTS,
        "VAR_DIR": str(var_dir),
        "DATABASE_URL": database_url,
        "BROKER_URL": redis_url,
        "REDIS_URL": redis_url,
        **s3.env(bucket),
    }


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """The `Settings` a child process given `env` reads (the fields it names, nothing else)."""
    values = {k.lower(): v for k, v in env.items() if k.lower() in Settings.model_fields}
    return Settings(**values)  # type: ignore[arg-type]
