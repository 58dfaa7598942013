"""The job service on the real path: slow model loads, database connections killed mid-job,
a worker frozen past its lease, tenant limits, retention. Real processes on Postgres, Redis and
moto's S3 server."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from shared.db import session_scope
from shared.models import Checkpoint, JobEvent
from shared.storage import make_store
from shared.tenancy import service as tenancy
from tests.faultproxy import FaultProxy
from tests.jobs.conftest import FAST_SPEC, ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORKER = ["-m", "worker.main", "worker"]


def claims(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["attempt"] for e in events if (e["data"] or {}).get("attempt")]


def transitions(events: list[dict[str, Any]], status: str) -> int:
    return sum(
        1
        for e in events
        if (e["data"] or {}).get("status") == status and "from" in (e["data"] or {})
    )


def seq(event: dict[str, Any]) -> int:
    """Event ids are one sequence across all jobs: they order events of different jobs."""
    return int(event["id"].removeprefix("ftevent-"))


def seconds_between(stack: ServiceStack, first: dict[str, Any], then: dict[str, Any]) -> float:
    """Time between two events, from the database's full-precision timestamps."""
    with session_scope(stack.settings) as session:
        a, b = (session.get(JobEvent, seq(e)) for e in (first, then))
        assert a is not None and b is not None
        return (b.created_at - a.created_at).total_seconds()


def step_events(events: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in events if e["type"] == "metrics" and "loss" in e["data"]]


def tenant_of(stack: ServiceStack, headers: dict[str, str], job_id: str) -> str:
    return str(stack.job(headers, job_id)["organization_id"])


def checkpoint_rows(stack: ServiceStack, job_id: str) -> list[Checkpoint]:
    with session_scope(stack.settings) as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        session.expunge_all()
        return list(rows)


def assert_checkpoints_intact(stack: ServiceStack, job_id: str, tmp_path: Path) -> None:
    """Every recorded checkpoint is complete in the store and passes its manifest's sha256."""
    from worker.training.checkpoint import read_checkpoint

    store = make_store(stack.settings)
    for row in checkpoint_rows(stack, job_id):
        target = tmp_path / f"verify-{row.id}"
        assert store.download_prefix(row.storage_prefix, target), row.storage_prefix
        read_checkpoint(target)  # raises CheckpointError on a missing or corrupt file


def test_a_base_model_slower_to_load_than_the_lease_runs_on_one_attempt(
    stack: ServiceStack, tmp_path: Path
) -> None:
    """A ~42M-parameter base: loading, 4-bit quantization, the first evaluation and the first
    step on this CPU take many times the 1 s lease the worker runs with. The heartbeat keeps
    the lease the whole time: one attempt, one start."""
    from worker.training.tiny import build_tiny_model

    lease = 1.0
    model_dir = build_tiny_model(
        tmp_path / "slow-llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    with session_scope(stack.settings) as session:
        tenancy.register_model(session, name="slow-llama", source=str(model_dir))
    headers = stack.new_tenant("slow-start")
    file_id = stack.upload(headers, addition_rows(200, seed=21))
    body = {
        "model": "slow-llama",
        "training_file": file_id,
        "qlora": {
            **FAST_SPEC,
            "max_steps": 2,
            "checkpoint_steps": 100,
            # a long first optimizer step: eight micro-batches of eight
            "batch_size": 8,
            "gradient_accumulation_steps": 8,
        },
    }
    with stack.http(headers) as c:
        resp = c.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    worker = stack.spawn("worker-slow", WORKER, LEASE_SECONDS=str(lease))
    try:
        done = stack.wait_for(
            headers, job["id"], lambda j: j["status"] in ("succeeded", "failed"), timeout=600
        )
    finally:
        stop(worker)
    events = stack.events(headers, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and claims(events) == [1]
    assert not any("stopped renewing" in e["message"] for e in events)
    started = next(e for e in events if (e["data"] or {}).get("attempt") == 1)
    first_step = next(e for e in events if e["type"] == "metrics" and "loss" in e["data"])
    # The premise: the worker was busy past several leases before its first progress write.
    busy = seconds_between(stack, started, first_step)
    print(f"busy for {busy:.1f} s before the first progress write (lease {lease} s)")
    assert busy >= 3 * lease, busy


def test_killed_database_connections_during_progress_writes_do_not_stop_training(
    stack: ServiceStack, tmp_path: Path
) -> None:
    headers = stack.new_tenant("db-faults")
    file_id = stack.upload(headers, addition_rows(120, seed=22))
    job = stack.submit(headers, file_id, max_steps=30, checkpoint_steps=5)
    worker_url = stack.settings.database_url + "?application_name=qlora-worker-dbfault"
    worker = stack.spawn(
        "worker-dbfault", WORKER, DATABASE_URL=worker_url, PROGRESS_INTERVAL_SECONDS="0"
    )
    admin = create_engine(stack.settings.database_url)
    killed = 0
    try:
        stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 2, timeout=300)
        deadline = time.monotonic() + 300
        while stack.job(headers, job["id"])["status"] == "running":
            with admin.connect() as conn:
                killed += len(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'qlora-worker-dbfault'"
                        )
                    ).all()
                )
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.4)
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] != "running")
    finally:
        stop(worker)
        admin.dispose()
    events = stack.events(headers, job["id"])
    assert killed >= 5, killed  # the faults really happened, many times
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and claims(events) == [1]
    assert transitions(events, "succeeded") == 1
    steps = step_events(events)
    assert steps == sorted(set(steps)) and steps[-1] == 30  # no step twice, none backwards
    assert_checkpoints_intact(stack, job["id"], tmp_path)


def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(
    stack: ServiceStack, tmp_path: Path
) -> None:
    headers = stack.new_tenant("frozen")
    file_id = stack.upload(headers, addition_rows(160, seed=23))
    job = stack.submit(headers, file_id, max_steps=60, checkpoint_steps=5)
    frozen = stack.spawn("worker-frozen", WORKER, LEASE_SECONDS="2")
    second = None
    try:
        stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 7, timeout=300)
        frozen.send_signal(signal.SIGSTOP)
        second = stack.spawn("worker-new-owner", WORKER, LEASE_SECONDS="2")
        stack.wait_for(headers, job["id"], lambda j: j["attempt"] == 2, timeout=120)
        # Let the new owner record a checkpoint of its own, then wake the old one.
        stack.wait_for(
            headers,
            job["id"],
            lambda j: any(r.attempt == 2 for r in checkpoint_rows(stack, j["id"])),
            timeout=300,
        )
        before = {(r.step, r.attempt, r.storage_prefix) for r in checkpoint_rows(stack, job["id"])}
        frozen.send_signal(signal.SIGCONT)
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] != "running", timeout=300)
    finally:
        frozen.send_signal(signal.SIGCONT)
        stop(frozen)
        if second is not None:
            stop(second)
    events = stack.events(headers, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert transitions(events, "succeeded") == 1 and claims(events) == [1, 2]
    after = checkpoint_rows(stack, job["id"])
    stale = {(r.step, r.attempt, r.storage_prefix) for r in after if r.attempt == 1}
    assert stale <= before  # the woken worker recorded nothing new
    assert_checkpoints_intact(stack, job["id"], tmp_path)
    log = "".join(p.read_text(errors="replace") for p in stack.logs.glob("worker-frozen-*.log"))
    assert "lease_lost" in log  # it noticed, and stopped


def test_a_tenant_at_its_running_limit_waits_visibly_then_runs(stack: ServiceStack) -> None:
    with stack.http(stack.admin) as c:
        tenant = c.post("/admin/tenants", json={"name": "one-slot", "max_running_jobs": 1}).json()
        key = c.post(f"/admin/tenants/{tenant['id']}/keys").json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    file_id = stack.upload(headers, addition_rows(60, seed=24))
    first = stack.submit(headers, file_id, max_steps=16, checkpoint_steps=100)
    second = stack.submit(headers, file_id, max_steps=4, checkpoint_steps=100)
    workers = [
        stack.spawn("worker-slot", WORKER, DEFER_SECONDS="600"),  # only the wake-up can free it
        stack.spawn("worker-slot", WORKER, DEFER_SECONDS="600"),
    ]
    try:
        for job in (first, second):
            stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded", timeout=300)
    finally:
        for proc in workers:
            stop(proc)
    a, b = (stack.events(headers, j["id"]) for j in (first, second))
    # one of them waited, said so once, and started only after the other finished
    waited = [
        events
        for events in (a, b)
        if any("Waiting for a running slot" in e["message"] for e in events)
    ]
    assert len(waited) == 1
    waiting_events = [e for e in waited[0] if "Waiting for a running slot" in e["message"]]
    assert len(waiting_events) == 1
    other = b if waited[0] is a else a
    other_done = next(e for e in other if (e["data"] or {}).get("status") == "succeeded")
    started = next(e for e in waited[0] if (e["data"] or {}).get("status") == "running")
    assert seq(started) > seq(other_done)


def test_retention_keeps_k_plus_best_and_adapter_delete_removes_the_rest(
    stack: ServiceStack,
) -> None:
    headers = stack.new_tenant("retention")
    file_id = stack.upload(headers, addition_rows(120, seed=25))
    job = stack.submit(
        headers, file_id, max_steps=24, checkpoint_steps=2, eval_steps=2, validation_fraction=0.2
    )
    worker = stack.spawn("worker-retention", WORKER, CHECKPOINT_KEEP_LAST="2")
    try:
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded")
    finally:
        stop(worker)
    rows = checkpoint_rows(stack, job["id"])
    steps = sorted(r.step for r in rows)
    best = min(rows, key=lambda r: (r.metrics["valid_loss"], r.step))
    assert steps[-2:] == [20, 22] and len(steps) <= 3 and best.step in steps
    recorded = [e for e in stack.events(headers, job["id"]) if "Checkpoint saved" in e["message"]]
    assert len(recorded) == 11  # eleven were written, the rest were pruned
    store = make_store(stack.settings)
    root = f"checkpoints/{tenant_of(stack, headers, job['id'])}/{job['id']}/"
    deadline = time.monotonic() + 60  # pruned objects go within a sweep or two
    while {k.rsplit("/", 1)[0] + "/" for k in store.list_keys(root)} != {
        r.storage_prefix for r in rows
    }:
        assert time.monotonic() < deadline, store.list_keys(root)
        time.sleep(0.5)
    with stack.http(headers) as c:
        assert c.delete(f"/v1/adapters/{done['adapter_id']}").status_code == 200
    deadline = time.monotonic() + 60
    while store.list_keys(root) or store.list_keys(f"adapters/{done['organization_id']}/"):
        assert time.monotonic() < deadline, store.list_keys(root)
        time.sleep(0.5)
    assert checkpoint_rows(stack, job["id"]) == []


@pytest.fixture
def store_proxy(stack: ServiceStack) -> Iterator[FaultProxy]:
    """A fault proxy in front of the stack's S3 endpoint; workers are pointed at it."""
    endpoint = stack.settings.s3_endpoint_url
    assert endpoint is not None
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), seed=11).start()
    yield proxy
    proxy.stop()


def faulty_store_worker(stack: ServiceStack, proxy: FaultProxy, name: str, **env: str) -> Any:
    return stack.spawn(
        name,
        WORKER,
        S3_ENDPOINT_URL=proxy.url,
        S3_CONNECT_TIMEOUT_SECONDS="1",
        S3_READ_TIMEOUT_SECONDS="2",
        S3_MAX_ATTEMPTS="2",
        **env,
    )


def test_store_resets_and_503s_during_uploads_are_retried_and_the_job_succeeds_once(
    stack: ServiceStack, store_proxy: FaultProxy, tmp_path: Path
) -> None:
    headers = stack.new_tenant("store-blips")
    file_id = stack.upload(headers, addition_rows(120, seed=26))
    job = stack.submit(headers, file_id, max_steps=30, checkpoint_steps=3)
    worker = faulty_store_worker(stack, store_proxy, "worker-blips")
    try:
        stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 1, timeout=300)
        store_proxy.set_mode("mix", fault_rate=0.5)  # half of all store connections fail
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] != "running", timeout=600)
    finally:
        store_proxy.set_mode("pass")
        stop(worker)
    events = stack.events(headers, job["id"])
    assert store_proxy.stats["faults"] >= 5  # the faults really happened
    if done["status"] != "succeeded" or claims(events) != [1]:
        pytest.fail(stack.explain(headers, job["id"]), pytrace=False)
    assert transitions(events, "succeeded") == 1
    assert_checkpoints_intact(stack, job["id"], tmp_path)
    with stack.http(headers) as c:
        archive = c.get(f"/v1/adapters/{done['adapter_id']}/download")
    assert archive.status_code == 200 and len(archive.content) > 1000


def test_a_store_down_past_the_retry_budget_requeues_the_job_which_then_succeeds(
    stack: ServiceStack, store_proxy: FaultProxy, tmp_path: Path
) -> None:
    headers = stack.new_tenant("store-down")
    file_id = stack.upload(headers, addition_rows(120, seed=27))
    job = stack.submit(headers, file_id, max_steps=30, checkpoint_steps=3)
    worker = faulty_store_worker(
        stack,
        store_proxy,
        "worker-store-down",
        TRANSIENT_RETRY_SECONDS="3",
        TRANSIENT_REQUEUE_DELAY_SECONDS="1",
    )
    try:
        stack.wait_for(headers, job["id"], lambda j: j["progress"]["step"] >= 2, timeout=300)
        store_proxy.set_mode("down")
        stack.wait_for(headers, job["id"], lambda j: j["status"] == "queued", timeout=300)
        store_proxy.set_mode("pass")
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] != "queued", timeout=300)
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] != "running", timeout=600)
    finally:
        store_proxy.set_mode("pass")
        stop(worker)
    events = stack.events(headers, job["id"])
    if done["status"] != "succeeded":
        pytest.fail(stack.explain(headers, job["id"]), pytrace=False)
    assert any("past the retry budget" in e["message"] for e in events)
    assert done["attempt"] >= 2 and transitions(events, "succeeded") == 1
    assert_checkpoints_intact(stack, job["id"], tmp_path)  # nothing partial was recorded
