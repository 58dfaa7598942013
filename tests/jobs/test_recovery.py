"""Workers die, get preempted, and the broker goes away: jobs still finish exactly once."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest

from tests.jobs.conftest import ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def transitions(events: list[dict[str, Any]], status: str) -> int:
    return sum(
        1
        for e in events
        if (e["data"] or {}).get("status") == status and "from" in (e["data"] or {})
    )


def claims(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["attempt"] for e in events if (e["data"] or {}).get("attempt")]


def resumed_from(events: list[dict[str, Any]]) -> list[str]:
    return [
        e["message"].rsplit(" ", 1)[-1]
        for e in events
        if e["message"].startswith("Resuming from checkpoint")
    ]


def test_kill_9_mid_job_resumes_from_the_last_checkpoint(stack: ServiceStack) -> None:
    headers = stack.new_tenant("kill9")
    file_id = stack.upload(headers, addition_rows(160, seed=11))
    job = stack.submit(headers, file_id, max_steps=40, checkpoint_steps=5)
    first = stack.start_worker()
    try:
        stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 20)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        stop(first)
    with stack.http(headers) as c:
        newest = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    # progress events are throttled, so the last one may predate the newest checkpoint
    killed_at = max(
        [newest["step_number"]]
        + [
            e["data"]["step"]
            for e in stack.events(headers, job["id"])
            if e["type"] == "metrics" and "loss" in (e["data"] or {})
        ]
    )
    second = stack.start_worker()
    try:
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded")
    finally:
        stop(second)
    events = stack.events(headers, job["id"])
    assert done["attempt"] == 2 and claims(events) == [1, 2]
    assert resumed_from(events) == [f"step-{newest['step_number']}"]
    redone = killed_at - newest["step_number"]
    assert 0 <= redone <= 5, (killed_at, newest["step_number"])
    assert any("stopped renewing its lease" in e["message"] for e in events)
    assert transitions(events, "succeeded") == 1
    assert done["progress"]["step"] == 40


def test_sigterm_checkpoints_before_exit_and_the_next_worker_resumes(stack: ServiceStack) -> None:
    headers = stack.new_tenant("sigterm")
    file_id = stack.upload(headers, addition_rows(160, seed=12))
    job = stack.submit(headers, file_id, max_steps=40, checkpoint_steps=100)
    first = stack.start_worker()
    stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 6)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=90) == 0  # a warm shutdown, not a crash
    queued = stack.job(headers, job["id"])
    assert queued["status"] == "queued" and queued["attempt"] == 1
    assert queued["max_attempts"] == 4  # a graceful preemption does not use up an attempt
    with stack.http(headers) as c:
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert len(ckpts) == 1 and ckpts[0]["step_number"] >= 6  # written on the way out
    second = stack.start_worker()
    try:
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded")
    finally:
        stop(second)
    events = stack.events(headers, job["id"])
    assert resumed_from(events) == [f"step-{ckpts[0]['step_number']}"]
    assert any(e["message"].startswith("Worker shutting down") for e in events)
    assert done["attempt"] == 2 and transitions(events, "succeeded") == 1


def test_a_job_whose_worker_always_dies_fails_after_max_attempts(stack: ServiceStack) -> None:
    headers = stack.new_tenant("doomed")
    file_id = stack.upload(headers, addition_rows(80, seed=13))
    job = stack.submit(headers, file_id, max_steps=400, checkpoint_steps=None)
    for attempt in (1, 2, 3):
        worker = stack.start_worker()
        try:
            stack.wait_for(
                headers,
                job["id"],
                lambda j, a=attempt: (
                    j["attempt"] == a and j["progress"]["step"] >= 1 and j["status"] == "running"
                ),
            )
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        finally:
            stop(worker)
    failed = stack.wait_for(headers, job["id"], lambda j: j["status"] == "failed", timeout=60)
    assert failed["error"]["code"] == "max_attempts_exceeded"
    assert "3 attempts" in failed["error"]["message"]
    assert stack.broker().llen("cpu") == 0
    # a late redelivery of the dead workers' message is dropped: nothing runs again
    worker = stack.start_worker()
    try:
        time.sleep(5)
        assert stack.job(headers, job["id"])["attempt"] == 3
    finally:
        stop(worker)


def test_broker_down_at_submit_delays_the_job_but_never_loses_it(stack: ServiceStack) -> None:
    headers = stack.new_tenant("outage")
    file_id = stack.upload(headers, addition_rows(80, seed=14))
    worker = stack.start_worker()
    try:
        subprocess.run(
            ["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False, capture_output=True
        )
        try:
            job = stack.submit(headers, file_id, max_steps=4, checkpoint_steps=2)
            assert job["status"] == "queued"
            time.sleep(3)
            assert stack.job(headers, job["id"])["status"] == "queued"
        finally:
            subprocess.run(REDIS_START, check=True)
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded")
    finally:
        stop(worker)
    events = stack.events(headers, job["id"])
    assert done["attempt"] == 1 and transitions(events, "running") == 1
    assert transitions(events, "succeeded") == 1


def test_an_unusable_checkpoint_costs_the_steps_not_the_job(stack: ServiceStack) -> None:
    from shared.storage import make_store

    headers = stack.new_tenant("corrupt")
    file_id = stack.upload(headers, addition_rows(80, seed=15))
    job = stack.submit(headers, file_id, max_steps=24, checkpoint_steps=100)
    first = stack.start_worker()
    stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 3)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=90) == 0
    with stack.http(headers) as c:
        ckpt = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    store = make_store(stack.settings)
    tenant = stack.job(headers, job["id"])["organization_id"]
    prefix = f"checkpoints/{tenant}/{job['id']}/attempt-1/step-{ckpt['step_number']}/"
    store.put_bytes(prefix + "adapter_model.safetensors", b"bit rot")  # sha256 no longer matches
    second = stack.start_worker()
    try:
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    finally:
        stop(second)
    assert done["status"] == "succeeded", done["error"]
    warnings = [e["message"] for e in stack.events(headers, job["id"]) if e["level"] == "warn"]
    assert any(m.startswith(f"Checkpoint step-{ckpt['step_number']} is unusable") for m in warnings)
