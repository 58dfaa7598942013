from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import Settings, with_local_secrets


@pytest.mark.parametrize("key", [None, "changeme", "changethis", "short-key"])
def test_production_refuses_placeholder_admin_key(key: str | None) -> None:
    with pytest.raises(ValidationError, match="ADMIN_API_KEY"):
        Settings(environment="production", admin_api_key=key, storage_url="s3://bucket")


def test_production_with_real_secrets_and_folder_store_needs_signing_secret() -> None:
    good = "k" * 40
    with pytest.raises(ValidationError, match="SIGNING_SECRET"):
        Settings(environment="production", admin_api_key=good, storage_url="file:///srv/objects")
    s = Settings(
        environment="production",
        admin_api_key=good,
        signing_secret=good,
        storage_url="file:///srv/objects",
    )
    assert s.storage_scheme == "file"


def test_embedded_defaults_live_under_var_dir(tmp_path: Path) -> None:
    s = Settings(var_dir=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'qlora.db'}"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert s.storage_url == f"file://{tmp_path / 'objects'}"
    assert s.max_upload_bytes == 1024**3 and s.redis_url is None


def test_local_secrets_are_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = with_local_secrets(Settings(var_dir=tmp_path))
    second = with_local_secrets(Settings(var_dir=tmp_path))
    assert first.admin_api_key and first.admin_api_key == second.admin_api_key
    assert len(first.admin_api_key) >= 40
    assert (tmp_path / "admin_api_key").stat().st_mode & 0o777 == 0o600
    assert first.signing_secret != first.admin_api_key
