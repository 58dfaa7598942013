"""Jobs the benchmarks run on a stack with a worker: submit one and follow it to the end (SSE or
polling), read its stored timestamps, and find when the worker was free again."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import select

from bench.common import BenchError, api_client, say
from bench.rawhttp import sse_events, sse_headers
from shared.config import Settings
from shared.db import session_scope
from shared.models import Job, JobEvent
from tests.harness import ServiceStack, addition_rows, job_body, log_tail

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_INTERVAL_S = 0.02
IDLE_GAP_S = 0.3  # after the worker is free, before the next "idle worker" submit
JOB_TIMEOUT_S = 600.0
# A one-step job: what the queue-latency benchmark submits (and, with more steps, overhead).
QUEUE_SPEC: dict[str, Any] = {
    "max_steps": 1,
    "checkpoint_steps": None,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "compute_dtype": "float32",
    "max_seq_length": 32,
    "validation_fraction": 0,
}


def bench_job(file_id: str, **qlora: Any) -> dict[str, Any]:
    return job_body(file_id, spec=QUEUE_SPEC, suffix="bench", **qlora)


def ts(value: datetime | None) -> float:
    """A stored (UTC) timestamp as epoch seconds; naive values are taken as UTC."""
    if value is None:
        return float("nan")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


@dataclass
class JobRun:
    job_id: str
    t_submit: float  # client, epoch seconds, before the POST
    t_response: float  # POST answered
    t_running: float  # client saw `running`
    t_final: float  # client saw the final state
    status: str
    job: dict[str, Any] = field(default_factory=dict)


async def run_and_watch(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any], detect: str
) -> JobRun:
    """Submit a job, then follow it until it is final: SSE events or 20 ms polling."""
    t_submit = time.time()
    resp = await client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    t_response = time.time()
    if resp.status_code != 200:
        raise BenchError(f"POST /v1/fine_tuning/jobs: {resp.status_code} {resp.text}")
    job_id = resp.json()["id"]
    if detect == "sse":
        t_running, t_final, status = await _watch_stream(client, headers, job_id)
    else:
        t_running, t_final, status = await _watch_polling(client, headers, job_id)
    job = (await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
    return JobRun(job_id, t_submit, t_response, t_running, t_final, status, job)


async def _watch_stream(
    client: httpx.AsyncClient, headers: dict[str, str], job_id: str
) -> tuple[float, float, str]:
    t_running = t_final = float("nan")
    status = "unknown"
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    async with asyncio.timeout(JOB_TIMEOUT_S):
        async with client.stream("GET", url, headers=sse_headers(headers)) as stream:
            async for event in sse_events(stream):
                now = time.time()
                if event.type == "done":
                    return t_running, t_final, event.data.get("status") or status
                state = (event.data.get("data") or {}).get("status")
                if state == "running" and t_running != t_running:
                    t_running = now
                if state in TERMINAL:
                    t_final, status = now, state
    return t_running, t_final, status


async def _watch_polling(
    client: httpx.AsyncClient, headers: dict[str, str], job_id: str
) -> tuple[float, float, str]:
    t_running = float("nan")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        got = (await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
        now = time.time()
        if got["status"] != "queued" and t_running != t_running:
            t_running = now  # `running`, or already final: the first sight of either
        if got["status"] in TERMINAL:
            return t_running, now, str(got["status"])
        if time.monotonic() > deadline:
            raise BenchError(f"{job_id} did not finish in {JOB_TIMEOUT_S:.0f}s")
        await asyncio.sleep(POLL_INTERVAL_S)


def stored_events(settings: Settings, job_id: str) -> list[tuple[float, dict[str, Any]]]:
    """(epoch seconds, data) of a job's events, oldest first; timestamps at full resolution."""
    with session_scope(settings) as session:
        rows = session.execute(
            select(JobEvent.created_at, JobEvent.data)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.seq)
        ).all()
    return [(ts(r.created_at), r.data or {}) for r in rows]


def first_status(events: list[tuple[float, dict[str, Any]]], status: str) -> float:
    return next((t for t, d in events if d.get("status") == status), float("nan"))


def job_times(settings: Settings, job_id: str) -> tuple[float, float, float]:
    """(created_at, started_at, finished_at) of a job as stored, epoch seconds."""
    with session_scope(settings) as session:
        row = session.get(Job, job_id)
        assert row is not None
        return ts(row.created_at), ts(row.started_at), ts(row.finished_at)


async def worker_free_at(stack: ServiceStack, job_id: str, timeout_s: float = 120.0) -> float:
    """When the worker's task for `job_id` returned (its log line `qlora.run_job(...) -> ...`),
    i.e. when the solo-pool worker could take the next message; epoch seconds (ms resolution)."""
    needle = f"qlora.run_job('{job_id}',) -> "
    log = stack.log_of("worker")
    deadline = time.monotonic() + timeout_s
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # local time
                return stamp.timestamp()
        if time.monotonic() > deadline:
            raise BenchError(f"the worker did not finish {job_id}:\n{log_tail(log)}")
        await asyncio.sleep(0.05)


async def warm_up(stack: ServiceStack, headers: dict[str, str], file_id: str, detect: str) -> str:
    """One job on a fresh worker, so that what follows does not measure a cold one."""
    async with api_client(stack) as client:
        run = await run_and_watch(client, headers, bench_job(file_id), detect)
    if run.status != "succeeded":
        raise BenchError(f"warm-up job {run.job_id} ended {run.status}: {run.job}")
    return run.job_id


def start_with_worker(stack: ServiceStack, api_workers: int) -> tuple[dict[str, str], str]:
    """The API and one worker (ready), a tenant and its training file; (headers, file id)."""
    stack.start_api(api_workers, quiet=True)
    headers = stack.new_tenant("bench-queue")
    file_id = stack.upload(headers, addition_rows(200, seed=1))
    say("\nstarting one worker")
    stack.start_worker(wait_ready=True)
    return headers, file_id
