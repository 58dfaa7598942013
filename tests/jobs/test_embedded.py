"""`make run`'s command on the embedded default: SQLite, a folder store and the SQLite Celery
transport, with the API, one worker and the beat as supervised child processes of one command.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import services
from tests.jobs.conftest import FAST_SPEC, ROOT, addition_rows
from tests.jobs.test_lifecycle import read_sse
from tests.jobs.test_recovery import claims, resumed_from, transitions

pytestmark = [pytest.mark.slow]
CLEAN_ENV_PREFIXES = ("DATABASE_", "BROKER_", "REDIS_", "STORAGE_", "S3_", "ADMIN_", "WORKER_")


@dataclass
class MakeRun:
    """A running `python -m api.embedded` and an HTTP client's view of it."""

    url: str
    var: Path
    log: Path
    process: subprocess.Popen[bytes]
    prestart_output: str
    admin: dict[str, str] = field(default_factory=dict)

    def http(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def new_tenant(self, name: str) -> dict[str, str]:
        with self.http(self.admin) as c:
            tenant = c.post("/admin/tenants", json={"name": name}).json()
            key = c.post(f"/admin/tenants/{tenant['id']}/keys").json()["key"]
        return {"Authorization": f"Bearer {key}"}

    def upload(self, headers: dict[str, str], rows: list[dict[str, str]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        with self.http(headers) as c:
            resp = c.post(
                "/v1/files", files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"}
            )
        assert resp.status_code == 200, resp.text
        file_id: str = resp.json()["id"]
        return file_id

    def submit(self, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        with self.http(headers) as c:
            resp = c.post("/v1/fine_tuning/jobs", json=body)
        assert resp.status_code == 200, resp.text
        job: dict[str, Any] = resp.json()
        return job

    def job(self, headers: dict[str, str], job_id: str) -> dict[str, Any]:
        with self.http(headers) as c:
            job: dict[str, Any] = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job

    def events(self, headers: dict[str, str], job_id: str) -> list[dict[str, Any]]:
        """All events, oldest first."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        with self.http(headers) as c:
            while True:
                page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
                out += page["data"]
                if not page["has_more"]:
                    return out[::-1]
                params["after"] = page["data"][-1]["id"]

    def workers(self) -> list[dict[str, Any]]:
        with self.http(self.admin) as c:
            resp = c.get("/admin/workers")
        assert resp.status_code == 200, resp.text
        fleet: list[dict[str, Any]] = resp.json()["data"]
        return fleet

    def wait(self, what: str, probe: Callable[[], Any], timeout: float = 300) -> Any:
        """Poll `probe` until it returns something truthy; fail with the service's log."""
        deadline = time.monotonic() + timeout
        while not (found := probe()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n{self.output()[-6000:]}")
            time.sleep(0.3)
        return found

    def wait_for_job(
        self, headers: dict[str, str], job_id: str, predicate: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            job = self.job(headers, job_id)
            return job if predicate(job) else None

        found: dict[str, Any] = self.wait(f"job {job_id}", probe)
        return found

    def live_worker(self, queue: str, *, other_than: str | None = None) -> dict[str, Any]:
        """Wait for a live worker consuming `queue` (and, if given, not `other_than`)."""

        def find() -> dict[str, Any] | None:
            return next(
                (
                    w
                    for w in self.workers()
                    if w["live"] and queue in w["queues"] and w["id"] != other_than
                ),
                None,
            )

        worker: dict[str, Any] = self.wait(f"a live worker on {queue}", find, timeout=120)
        return worker


def make_run_env(tmp_path: Path, port: int, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN_ENV_PREFIXES)}
    env.update(
        VAR_DIR=str(tmp_path / "var"),
        PORT=str(port),
        HF_HUB_OFFLINE="1",
        LEASE_SECONDS="10",
        SWEEP_INTERVAL_SECONDS="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


@contextmanager
def make_run(tmp_path: Path, **env_overrides: str) -> Iterator[MakeRun]:
    """`make run` (prestart, then `python -m api.embedded`) in `tmp_path`; on the way out,
    Ctrl-C must stop it cleanly: exit 0, "stopped", nothing left listening."""
    port = services.free_port()
    env = make_run_env(tmp_path, port, **env_overrides)
    prestart = subprocess.run(
        [sys.executable, "-m", "api.prestart"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prestart.returncode == 0, prestart.stderr
    worker_prestart = subprocess.run(
        [sys.executable, "-m", "worker.prestart"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker_prestart.returncode == 0, worker_prestart.stderr
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.embedded"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    run = MakeRun(f"http://127.0.0.1:{port}", tmp_path / "var", log, process, prestart.stdout)
    try:
        run.wait("the API", lambda: answers(f"{run.url}/readyz"), timeout=60)
        key = (run.var / "admin_api_key").read_text().strip()
        run.admin = {"Authorization": f"Bearer {key}"}
        yield run
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 0, run.output()[-4000:]
    assert "stopped" in run.output()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{run.url}/healthz", timeout=2)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class HealthWatch:
    """Polls `/healthz` from a thread and counts the answers that were not 200."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = httpx.get(f"{self.url}/healthz", timeout=10).status_code
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except httpx.HTTPError as exc:
                self.failures.append(type(exc).__name__)
            self._stop.wait(0.2)


def test_make_run_trains_a_job_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    with make_run(tmp_path) as run:
        key_file = run.var / "admin_api_key"
        assert str(key_file) in run.prestart_output and "/admin/tenants" in run.prestart_output
        assert key_file.stat().st_mode & 0o777 == 0o600
        with run.http(run.admin) as c:
            assert [m["id"] for m in c.get("/admin/models").json()["data"]] == ["tiny-llama"]
        auth = run.new_tenant("laptop")
        file_id = run.upload(auth, addition_rows(80, seed=21))
        job = run.submit(
            auth,
            {
                "model": "tiny-llama",
                "training_file": file_id,
                "qlora": {**FAST_SPEC, "max_steps": 6, "checkpoint_steps": 3},
            },
        )
        with run.http(auth) as c:
            # No Redis here: the live stream polls the table. Watch the job to its end.
            sse = {"Accept": "text/event-stream"}
            with c.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", headers=sse) as r:
                streamed = [seq for seq, _ in read_sse(r)]
            current = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            stored = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000")
            ids = [int(e["id"].removeprefix("ftevent-")) for e in stored.json()["data"]]
            assert streamed == ids[::-1]
            assert current["status"] == "succeeded", current
            download = c.get(
                f"/v1/adapters/{current['adapter_id']}/download?redirect=true",
                follow_redirects=True,
            )
            assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"
        assert [w["live"] for w in run.workers()] == [True]
    # A clean stop unregisters the worker.
    with sqlite3.connect(tmp_path / "var" / "qlora.db") as db:
        assert db.execute("SELECT count(*) FROM workers").fetchone() == (0,)


def test_make_run_brings_a_killed_worker_back_and_the_job_resumes(tmp_path: Path) -> None:
    """kill -9 of the worker mid-job (an OOM kill on a laptop): the API keeps answering, the
    supervisor restarts the worker, and the job resumes from its checkpoint on attempt 2."""
    with make_run(
        tmp_path,
        LEASE_SECONDS="3",
        PROGRESS_INTERVAL_SECONDS="0.3",
        WORKER_HEARTBEAT_SECONDS="1",
    ) as run:
        first = run.live_worker("cpu")
        auth = run.new_tenant("laptop")
        file_id = run.upload(auth, addition_rows(160, seed=31))
        job = run.submit(
            auth,
            {
                "model": "tiny-llama",
                "training_file": file_id,
                "qlora": {**FAST_SPEC, "max_steps": 40, "checkpoint_steps": 5},
            },
        )
        run.wait_for_job(auth, job["id"], lambda j: j["progress"]["step"] >= 12)
        with HealthWatch(run.url) as health:
            os.kill(int(first["id"].rsplit(":", 1)[1]), signal.SIGKILL)
            second = run.live_worker("cpu", other_than=first["id"])
            done = run.wait_for_job(
                auth, job["id"], lambda j: j["status"] in ("succeeded", "failed")
            )
        assert health.failures == [] and health.ok > 0
        assert "worker died (killed by SIGKILL); restarting it in 1s" in run.output()
        assert "api died" not in run.output() and "beat died" not in run.output()
        assert second["id"] != first["id"]
        events = run.events(auth, job["id"])
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2 and claims(events) == [1, 2]
        assert len(resumed_from(events)) == 1
        assert transitions(events, "succeeded") == 1 and done["progress"]["step"] == 40
