"""`make run`'s command on the embedded default: SQLite, a folder store and the SQLite Celery
transport, with the API, one worker and the beat as child processes of one command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import services
from tests.jobs.conftest import FAST_SPEC, ROOT, addition_rows
from tests.jobs.test_lifecycle import read_sse

pytestmark = [pytest.mark.slow]


def test_make_run_trains_a_job_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = services.free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_", "BROKER_", "REDIS_", "STORAGE_", "S3_", "ADMIN_"))
    }
    env.update(
        VAR_DIR=str(tmp_path / "var"),
        PORT=str(port),
        HF_HUB_OFFLINE="1",
        LEASE_SECONDS="10",
        SWEEP_INTERVAL_SECONDS="1",
        OMP_NUM_THREADS="1",
    )
    prestart = subprocess.run(
        [sys.executable, "-m", "api.prestart"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prestart.returncode == 0, prestart.stderr
    key_file = tmp_path / "var" / "admin_api_key"
    assert str(key_file) in prestart.stdout and "/admin/tenants" in prestart.stdout
    assert key_file.stat().st_mode & 0o777 == 0o600
    admin = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.embedded"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert [m["id"] for m in c.get("/admin/models", headers=admin).json()["data"]] == [
                "tiny-llama"
            ]
            tenant = c.post("/admin/tenants", json={"name": "laptop"}, headers=admin).json()
            key = c.post(f"/admin/tenants/{tenant['id']}/keys", headers=admin).json()["key"]
            auth = {"Authorization": f"Bearer {key}"}
            body = "".join(json.dumps(r) + "\n" for r in addition_rows(80, seed=21))
            file_id = c.post(
                "/v1/files",
                files={"file": ("t.jsonl", body.encode())},
                data={"purpose": "fine-tune"},
                headers=auth,
            ).json()["id"]
            job = c.post(
                "/v1/fine_tuning/jobs",
                headers=auth,
                json={
                    "model": "tiny-llama",
                    "training_file": file_id,
                    "qlora": {**FAST_SPEC, "max_steps": 6, "checkpoint_steps": 3},
                },
            ).json()
            # No Redis here: the live stream polls the table. Watch the job to its end.
            sse = {**auth, "Accept": "text/event-stream"}
            with c.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", headers=sse) as r:
                streamed = [seq for seq, _ in read_sse(r)]
            current = c.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).json()
            stored = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000", headers=auth)
            ids = [int(e["id"].removeprefix("ftevent-")) for e in stored.json()["data"]]
            assert streamed == ids[::-1]
            assert current["status"] == "succeeded", current
            download = c.get(
                f"/v1/adapters/{current['adapter_id']}/download?redirect=true",
                headers=auth,
                follow_redirects=True,
            )
            assert download.status_code == 200 and download.content[:2] == b"\x1f\x8b"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    assert code == 0
    assert "stopped" in (tmp_path / "run.log").read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)
