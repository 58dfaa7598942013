"""Prestart step shared by `make run` and the api container: wait for the database, migrate,
and on the embedded default print how to reach the admin API. (The tiny local base model is
built by `python -m worker.prestart`: building a model needs torch, which the API lacks.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from shared.config import Settings, ensure_local_secret, get_settings
from shared.db import get_engine

log = logging.getLogger("prestart")
ROOT = Path(__file__).resolve().parent.parent


def wait_for_database(settings: Settings, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with get_engine(settings).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise
            log.info("database not ready (%s); retrying", type(exc).__name__)
            time.sleep(1.0)


def migrate(settings: Settings) -> None:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    command.upgrade(cfg, "head")


def announce_admin_key(settings: Settings, port: int) -> None:
    if settings.environment != "development":
        return
    path = settings.var_dir.resolve() / "admin_api_key"
    _, created = ensure_local_secret(settings, "admin_api_key")
    if Settings().admin_api_key:
        return  # set explicitly in the environment: nothing to announce
    base = f"http://127.0.0.1:{port}"
    print(
        f"\nAdmin API key {'generated and ' if created else ''}kept in {path} (mode 0600).\n"
        "Create a tenant and an API key:\n"
        f"  ADMIN=$(cat {path})\n"
        f'  curl -s -X POST {base}/admin/tenants -H "Authorization: Bearer $ADMIN" '
        "-H 'Content-Type: application/json' -d '{\"name\": \"acme\"}'\n"
        f"  curl -s -X POST {base}/admin/tenants/<tenant id>/keys "
        '-H "Authorization: Bearer $ADMIN"\n',
        flush=True,
    )


def main() -> None:
    import os

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    settings = get_settings()
    wait_for_database(settings)
    migrate(settings)
    announce_admin_key(settings, int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
