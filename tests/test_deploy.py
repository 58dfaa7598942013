"""The production shape: compose validates, and containers run the Makefile's commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import services

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def test_compose_file_validates() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if services.REQUIRE_SERVICES:
            pytest.fail("REQUIRE_SERVICES=1 but docker-compose is not installed")
        pytest.skip("docker-compose is not installed (.ci/run installs it)")
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"],
        env={"ADMIN_API_KEY": "a-real-secret-for-validation-only", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_containers_run_the_makefile_commands() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "createbucket", "api", "worker", "beat"} <= set(services)
    makefile = (ROOT / "Makefile").read_text()
    api_cmd = " ".join(services["api"]["command"])
    assert "python -m api.prestart" in api_cmd and "uvicorn api.main:app" in api_cmd
    assert "$(PY) -m api.prestart" in makefile and "uvicorn api.main:app" in makefile
    worker_cmd = " ".join(services["worker"]["command"])
    assert "python -m worker.prestart" in worker_cmd
    assert "python -m worker.main worker" in worker_cmd
    assert services["beat"]["command"] == ["python", "-m", "worker.main", "beat"]
    assert "$(PY) -m worker.main worker" in makefile and "$(PY) -m worker.main beat" in makefile
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert services["api"]["environment"]["ENVIRONMENT"] == "production"
    assert services["api"]["environment"]["STORAGE_URL"].startswith("s3://")


def test_api_worker_and_beat_come_back_after_a_crash() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("api", "worker", "beat"):
        assert services[name].get("restart") in ("unless-stopped", "on-failure", "always"), name
    assert services["createbucket"]["restart"] == "no"  # a one-shot job
    assert services["worker"]["environment"]["WORKER_QUEUES"] == "${WORKER_QUEUES:-auto}"


def test_dockerfiles_use_the_same_entry_points() -> None:
    api = (ROOT / "Dockerfile.api").read_text()
    worker = (ROOT / "Dockerfile.worker").read_text()
    assert "uvicorn api.main:app" in api and "python -m api.prestart" in api
    assert "python -m worker.main worker" in worker.splitlines()[-1]
    assert (
        worker.splitlines()[1].startswith("FROM pytorch/pytorch:")
        and "cuda" in worker.splitlines()[1]
    )


def test_the_api_and_beat_import_no_training_engine() -> None:
    """Their image installs no `worker` extra: importing the app, its prestart and the beat
    must not pull torch, transformers, peft or bitsandbytes."""
    engine = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    code = (
        "import sys, api.main, api.prestart, api.embedded, worker.main, worker.sweeper; "
        f"print(sorted(m for m in {engine!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
