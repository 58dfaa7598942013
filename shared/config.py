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
    s3_connect_timeout_seconds: float = Field(5.0, gt=0, description="S3 connect timeout.")
    s3_read_timeout_seconds: float = Field(
        30.0, gt=0, description="S3 read timeout: a stalled store is noticed this fast."
    )
    s3_max_attempts: int = Field(
        4, ge=1, description="boto's own tries per S3 call (standard retry mode)."
    )
    admin_api_key: str | None = Field(None, description="Bearer key of the /admin API.")
    signing_secret: str | None = Field(
        None, description="HMAC key for signed download URLs of the folder store."
    )
    max_upload_bytes: int = Field(GIB, gt=0, description="Largest accepted upload, in bytes.")
    max_line_bytes: int = Field(1024 * 1024, gt=0, description="Longest accepted JSONL line.")
    public_base_url: str = Field("", description="Base of absolute URLs the API hands out.")
    worker_queues: str = Field(
        "auto",
        description="Comma-separated GPU-class queues to consume; `auto`: every class this "
        "worker's memory holds, plus `cpu`.",
    )
    models_dir: Path | None = Field(None, description="Where generated local base models live.")
    lease_seconds: float = Field(60.0, gt=0, description="A worker's hold on a running job.")
    sweep_interval_seconds: float = Field(10.0, gt=0, description="How often the beat sweeps.")
    progress_interval_seconds: float = Field(
        2.0, ge=0, description="Least time between progress writes (lease renewals) of a job."
    )
    register_tiny_model: bool = Field(
        True, description="Prestart builds and registers the local `tiny-llama` base model."
    )
    # --- worker resilience (heartbeat leases, fault retries, deferral) ----------------------
    lease_renew_fraction: float = Field(
        1 / 3, gt=0, lt=1, description="The heartbeat renews the lease every this fraction of it."
    )
    transient_retry_seconds: float = Field(
        60.0,
        gt=0,
        description="Retry budget of one transient fault inside an attempt (for resumable "
        "uploads: time without an object landing).",
    )
    transient_requeue_delay_seconds: float = Field(
        30.0, ge=0, description="A job requeued after a transient fault waits this long."
    )
    defer_seconds: float = Field(
        15.0, gt=0, description="How often a job waiting for its tenant's slot is re-checked."
    )
    # --- worker fleet ------------------------------------------------------------------------
    worker_memory_bytes: int | None = Field(
        None, gt=0, description="Memory this worker declares (default: VRAM, or RAM on a CPU)."
    )
    worker_heartbeat_seconds: float = Field(
        10.0, gt=0, description="How often a worker announces itself in `workers`."
    )
    worker_stale_seconds: float = Field(
        45.0, gt=0, description="A worker unheard of this long is not live."
    )
    # --- retention ---------------------------------------------------------------------------
    checkpoint_keep_last: int = Field(
        3, ge=1, description="Checkpoints kept per job: the newest K plus the best by eval loss."
    )
    outbox_retention_hours: float = Field(24.0, gt=0, description="Sent outbox rows kept.")
    multipart_abort_after_hours: float = Field(
        24.0, gt=0, description="Unfinished S3 multipart uploads older than this are aborted."
    )
    # --- input bounds ------------------------------------------------------------------------
    max_json_body_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest accepted JSON request body (413 above)."
    )
    max_multipart_fields: int = Field(16, gt=0, description="Most multipart parts per request.")
    max_multipart_field_bytes: int = Field(
        64 * 1024, gt=0, description="Largest non-file multipart field."
    )
    max_filename_chars: int = Field(255, gt=0, description="Longest accepted upload filename.")
    max_streams_per_tenant: int = Field(
        32, gt=0, description="Concurrent SSE streams per tenant in one API process (429 above)."
    )
    # --- webhooks (docs/webhooks.md) ----------------------------------------------------------
    webhooks_allow_private: bool = Field(
        False,
        description="Admin switch: let webhook URLs resolve to loopback, private, link-local or "
        "other non-public addresses (a receiver on this machine or the LAN).",
    )
    webhooks_max_endpoints: int = Field(10, gt=0, description="Webhook endpoints per tenant.")
    webhooks_timeout_seconds: float = Field(
        10.0, gt=0, description="Connect and read timeout of one webhook delivery attempt."
    )
    webhooks_retry_base_seconds: float = Field(
        10.0, gt=0, description="Wait after a delivery's first failed attempt; doubles each time."
    )
    webhooks_retry_max_interval_seconds: float = Field(
        3600.0, gt=0, description="Longest wait between two attempts of one delivery."
    )
    webhooks_max_attempts: int = Field(
        12, ge=1, description="Attempts of one delivery before it is marked failed."
    )
    webhooks_retry_window_seconds: float = Field(
        24 * 3600.0, gt=0, description="No delivery is retried later than this after its event."
    )
    # --- experiment tracking (docs/integrations.md) ----------------------------------------
    wandb_api_key: str | None = Field(
        None, description="Weights & Biases key: jobs may ask for the `wandb` integration."
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="W&B's own WANDB_MODE; `offline` enables the integration without a key "
        "(runs are written under WANDB_DIR for `wandb sync`), `disabled` turns it off.",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server (or sqlite:/file: store) for `mlflow`."
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
    def tracking_integrations(self) -> frozenset[str]:
        """The `integrations` types this deployment can honour."""
        kinds = set()
        if self.wandb_mode != "disabled" and (self.wandb_api_key or self.wandb_mode == "offline"):
            kinds.add("wandb")
        if self.mlflow_tracking_uri:
            kinds.add("mlflow")
        return frozenset(kinds)

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
