"""The whole service as separate processes: a uvicorn API, the beat, and Celery workers,
on a real Postgres database, Redis (broker and pub/sub) and S3 over HTTP (moto's server)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.prestart import migrate
from shared.config import Settings
from shared.db import session_scope
from shared.tenancy import service as tenancy
from tests import services
from tests.conftest import ADMIN_KEY, SIGNING_SECRET, MotoS3

ROOT = Path(__file__).resolve().parents[2]
BROKER_DB = 11  # a Redis database of its own, flushed per module

# A short job: a few seconds of training on the tiny model, with checkpoints.
FAST_SPEC: dict[str, Any] = {
    "max_steps": 12,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "checkpoint_steps": 4,
    "compute_dtype": "float32",
    "max_seq_length": 64,
    "validation_fraction": 0.1,
    "learning_rate": 2e-3,
}


def addition_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return rows


@dataclass
class ServiceStack:
    url: str
    env: dict[str, str]
    settings: Settings
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def http(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=60)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}-{len(self.processes)}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        return self.spawn("worker", ["-m", "worker.main", "worker"])

    def new_tenant(self, name: str = "acme") -> dict[str, str]:
        with self.http(self.admin) as c:
            tenant = c.post("/admin/tenants", json={"name": name, "max_running_jobs": 4}).json()
            key = c.post(f"/admin/tenants/{tenant['id']}/keys").json()["key"]
        return {"Authorization": f"Bearer {key}"}

    def upload(self, headers: dict[str, str], rows: list[dict[str, str]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        with self.http(headers) as c:
            resp = c.post(
                "/v1/files", files={"file": ("train.jsonl", body)}, data={"purpose": "fine-tune"}
            )
        assert resp.status_code == 200, resp.text
        file_id: str = resp.json()["id"]
        return file_id

    def submit(self, headers: dict[str, str], file_id: str, **qlora: Any) -> dict[str, Any]:
        body = {
            "model": "tiny-llama",
            "training_file": file_id,
            "suffix": "test",
            "qlora": {**FAST_SPEC, **qlora},
        }
        with self.http(headers) as c:
            resp = c.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def job(self, headers: dict[str, str], job_id: str) -> dict[str, Any]:
        with self.http(headers) as c:
            result: dict[str, Any] = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            return result

    def events(self, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
        """All events, oldest first, through the paginated list endpoint."""
        out: list[dict[str, Any]] = []
        after = None
        with self.http(headers) as c:
            while True:
                params: dict[str, Any] = {"limit": 100}
                if after:
                    params["after"] = after
                page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
                out += page["data"]
                if not page["has_more"]:
                    break
                after = page["data"][-1]["id"]
        return out[::-1]

    def wait_for(
        self,
        headers: dict[str, str],
        job_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 240,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job = self.job(headers, job_id)
        while not predicate(job):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting on {job_id}: {json.dumps(job)[:800]}\n" + self.tail_logs()
                )
            time.sleep(0.2)
            job = self.job(headers, job_id)
        return job

    def tail_logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["BROKER_URL"])


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3, base_model_dir: Path
) -> Iterator[ServiceStack]:
    services.require("Postgres", services.postgres_available())
    services.require("Redis", services.redis_available())
    var = tmp_path_factory.mktemp("var")
    logs = tmp_path_factory.mktemp("logs")
    bucket = moto_s3.new_bucket()
    redis_base = services.REDIS_URL.rsplit("/", 1)[0]
    redis.Redis.from_url(f"{redis_base}/{BROKER_DB}").flushdb()
    port = services.free_port()
    with services.temporary_postgres_database() as db_url:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV"))},
            "ENVIRONMENT": "development",
            "VAR_DIR": str(var),
            "DATABASE_URL": db_url,
            "BROKER_URL": f"{redis_base}/{BROKER_DB}",
            "REDIS_URL": f"{redis_base}/{BROKER_DB}",
            "STORAGE_URL": f"s3://{bucket}",
            "S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "S3_ACCESS_KEY_ID": "testing",
            "S3_SECRET_ACCESS_KEY": "testing",
            "ADMIN_API_KEY": ADMIN_KEY,
            "SIGNING_SECRET": SIGNING_SECRET,
            "LEASE_SECONDS": "4",
            "SWEEP_INTERVAL_SECONDS": "1",
            "PROGRESS_INTERVAL_SECONDS": "0.3",
            "WORKER_QUEUES": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        settings = Settings(
            **{
                k.lower(): v
                for k, v in env.items()  # type: ignore[arg-type]
                if k.lower() in Settings.model_fields
            }
        )
        migrate(settings)
        with session_scope(settings) as session:
            tenancy.register_model(
                session,
                name="tiny-llama",
                source=str(base_model_dir),
            )
        svc = ServiceStack(url=f"http://127.0.0.1:{port}", env=env, settings=settings, logs=logs)
        svc.spawn(
            "api", ["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        )
        svc.spawn("beat", ["-m", "worker.main", "beat"])
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{svc.url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start:\n" + svc.tail_logs())
            time.sleep(0.3)
        try:
            yield svc
        finally:
            for proc in svc.processes:
                stop(proc, timeout=30)
            from shared.db import _engine_for

            _engine_for(db_url).dispose()
