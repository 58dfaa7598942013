"""The whole service as separate processes: a uvicorn API, the beat and Celery workers, on a
temporary Postgres database, a leased Redis database (broker and pub/sub) and S3 over HTTP."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from shared.config import Settings
from shared.db import session_scope
from shared.tenancy import service as tenancy
from tests.harness.backends import leased_redis_db, migrate_database, temporary_postgres_database
from tests.harness.processes import (
    StackError,
    free_port,
    inherited_env,
    log_tail,
    process_tree,
    start_process,
    stop_process,
    wait_for_log,
    wait_http,
)
from tests.harness.s3 import MotoS3
from tests.harness.settings import ADMIN_KEY, services_env, settings_from_env

BASE_MODEL = "tiny-llama"
# Redis databases a stack may lease, in order of preference; 12 is the benchmarks' default.
STACK_REDIS_DBS = (11, 13, 14, 15, 10, 9, 8)
# Short leases and sweeps, so the tests' recovery paths run in seconds.
TEST_TIMINGS = {
    "LEASE_SECONDS": "4",
    "SWEEP_INTERVAL_SECONDS": "1",
    "PROGRESS_INTERVAL_SECONDS": "0.3",
}
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
WORKER_ARGS = ["-m", "worker.main", "worker"]


def addition_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        rows.append({"prompt": f"{a}+{b}=", "completion": f"{a + b}"})
    return rows


def jsonl(rows: Sequence[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def job_body(
    file_id: str, *, spec: Mapping[str, Any] = FAST_SPEC, suffix: str = "test", **qlora: Any
) -> dict[str, Any]:
    """A `POST /v1/fine_tuning/jobs` body on the tiny base: `spec` with `qlora` on top."""
    return {
        "model": BASE_MODEL,
        "training_file": file_id,
        "suffix": suffix,
        "qlora": {**spec, **qlora},
    }


def api_args(port: int, *, workers: int = 1, quiet: bool = False) -> list[str]:
    args = ["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    if quiet:
        args += ["--log-level", "warning", "--no-access-log"]
    return args


def wait_for_api_workers(proc: subprocess.Popen[bytes], log: Path, workers: int) -> None:
    """Every one of uvicorn's `workers` processes up, not only the first one to answer."""
    deadline = time.monotonic() + 60
    while len(process_tree(proc.pid)) < workers + 1:
        if time.monotonic() > deadline:
            raise StackError("API workers did not start:\n" + log_tail(log))
        time.sleep(0.2)
    time.sleep(2.0)


@dataclass
class ServiceStack:
    url: str
    env: dict[str, str]
    settings: Settings
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # latest per name
    log_files: dict[int, Path] = field(default_factory=dict)  # by pid
    api_workers: int = 1

    # ---------------------------------------------------------------- processes

    def spawn(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        """`python args...` with the stack's environment plus `env`, logging to
        `logs/{name}-{n}.log`."""
        log = self.logs / f"{name}-{len(self.processes)}.log"
        proc = start_process(args, {**self.env, **env}, log)
        self.processes.append(proc)
        self.named[name] = proc
        self.log_files[proc.pid] = log
        return proc

    def log_of(self, proc_or_name: subprocess.Popen[bytes] | str) -> Path:
        proc = self.named[proc_or_name] if isinstance(proc_or_name, str) else proc_or_name
        return self.log_files[proc.pid]

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        """The latest process started under `name`, if it is still running."""
        proc = self.named.get(name)
        return proc if proc is not None and proc.poll() is None else None

    def check_alive(self, name: str) -> None:
        proc = self.named.get(name)
        if proc is None or proc.poll() is not None:
            tail = log_tail(self.log_of(proc)) if proc is not None else "(never started)"
            raise StackError(f"{name} is not running:\n{tail}")

    def stop(self, name: str, timeout: float = 60) -> None:
        proc = self.named.pop(name, None)
        if proc is not None:
            stop_process(proc, timeout=timeout)

    def stop_all(self, timeout: float = 30) -> None:
        for proc in self.processes:
            stop_process(proc, timeout=timeout)
        self.named.clear()

    def start_worker(self, *, wait_ready: bool = False, **env: str) -> subprocess.Popen[bytes]:
        """A Celery worker (`WORKER_QUEUES=cpu` unless `env` says otherwise); with `wait_ready`,
        returns once it logged " ready."."""
        proc = self.spawn("worker", WORKER_ARGS, **env)
        if wait_ready:
            wait_for_log(proc, self.log_of(proc), " ready.")
        return proc

    def spawn_api(
        self, name: str = "api", *, workers: int = 1, quiet: bool = False, **env: str
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Another uvicorn API on a free port with the stack's environment plus `env`, once it
        answers `/healthz`; returns the process and its URL."""
        port = free_port()
        proc = self.spawn(name, api_args(port, workers=workers, quiet=quiet), **env)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc=proc, log=self.log_of(proc), timeout=90)
        if workers > 1:
            wait_for_api_workers(proc, self.log_of(proc), workers)
        return proc, url

    def start_api(self, workers: int = 1, *, quiet: bool = False, **env: str) -> None:
        """(Re)start the stack's own API: `url` then points at it."""
        self.stop("api", timeout=20)
        _, self.url = self.spawn_api("api", workers=workers, quiet=quiet, **env)
        self.api_workers = workers

    def tail_logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def broker(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["BROKER_URL"])

    # ---------------------------------------------------------------- HTTP

    def http(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=60)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def new_tenant(self, name: str = "acme", **limits: int) -> dict[str, str]:
        """A tenant (4 running jobs unless `limits` say otherwise) and its key's auth headers."""
        with self.http(self.admin) as c:
            tenant = _expect(
                c.post("/admin/tenants", json={"max_running_jobs": 4, **limits, "name": name}), 201
            )
            key = _expect(c.post(f"/admin/tenants/{tenant['id']}/keys"), 201)
        return {"Authorization": f"Bearer {key['key']}"}

    def upload(self, headers: dict[str, str], rows: Sequence[Mapping[str, Any]]) -> str:
        with self.http(headers) as c:
            resp = c.post(
                "/v1/files",
                files={"file": ("train.jsonl", jsonl(rows))},
                data={"purpose": "fine-tune"},
            )
        file_id: str = _expect(resp, 200)["id"]
        return file_id

    def submit(self, headers: dict[str, str], file_id: str, **qlora: Any) -> dict[str, Any]:
        with self.http(headers) as c:
            return _expect(c.post("/v1/fine_tuning/jobs", json=job_body(file_id, **qlora)), 200)

    def job(self, headers: dict[str, str], job_id: str) -> dict[str, Any]:
        with self.http(headers) as c:
            result: dict[str, Any] = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            return result

    def events(self, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
        """All events, oldest first, through the paginated list endpoint."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        with self.http(headers) as c:
            while True:
                page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
                out += page["data"]
                if not page["has_more"]:
                    return out[::-1]
                params["after"] = page["data"][-1]["id"]

    def explain(self, headers: dict[str, str], job_id: str) -> str:
        """Why a job is where it is, for a failing test's message: the job, every event in
        full, and every warning or error line of every process's log (not truncated: CI shows
        only this part of a failure)."""
        lines = [f"job {job_id}: {json.dumps(self.job(headers, job_id))[:2000]}", "events:"]
        lines += [
            f"  {e['created_at']} {e['level']}: {e['message']}"
            for e in self.events(headers, job_id)
        ]
        for path in sorted(self.logs.glob("*.log")):
            noisy = [
                line[:400]
                for line in path.read_text(errors="replace").splitlines()
                if " WARNING " in line or " ERROR " in line or "Traceback" in line
            ]
            lines += [f"--- {path.name}: {len(noisy)} warning/error lines (last 60)", *noisy[-60:]]
        return "\n".join(lines)

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


def _expect(resp: httpx.Response, status: int) -> dict[str, Any]:
    if resp.status_code != status:
        raise StackError(
            f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text[:1000]}"
        )
    body: dict[str, Any] = resp.json()
    return body


def register_base_model(settings: Settings, model_dir: Path) -> None:
    with session_scope(settings) as session:
        tenancy.register_model(session, name=BASE_MODEL, source=str(model_dir))


@contextmanager
def service_stack(
    work: Path,
    *,
    s3: MotoS3,
    model_dir: Path,
    env: Mapping[str, str] | None = None,
    redis_dbs: Sequence[int] = STACK_REDIS_DBS,
    api: bool = True,
    beat: bool = True,
) -> Iterator[ServiceStack]:
    """A services stack in `work` (its var dir and logs): a temporary, migrated Postgres
    database with `model_dir` registered as `tiny-llama`, a leased Redis database, a new bucket
    on `s3`, then the beat and the API (unless told not to). `env` is added to every process's
    environment (e.g. `TEST_TIMINGS`, `LEASE_SECONDS`). Workers are started by the caller
    (`start_worker`, `spawn`). Everything is stopped and dropped on the way out."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bucket = s3.new_bucket()
    with leased_redis_db(redis_dbs) as redis_url, temporary_postgres_database() as db_url:
        child_env = {
            **inherited_env(),
            **services_env(
                var_dir=work / "var", database_url=db_url, redis_url=redis_url, s3=s3, bucket=bucket
            ),
            **(env or {}),
        }
        settings = settings_from_env(child_env)
        migrate_database(settings)
        register_base_model(settings, model_dir)
        stack = ServiceStack(url="", env=child_env, settings=settings, logs=logs)
        try:
            if beat:
                stack.spawn("beat", ["-m", "worker.main", "beat"])
            if api:
                stack.start_api()
            yield stack
        finally:
            stack.stop_all()
