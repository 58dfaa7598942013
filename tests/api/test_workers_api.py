"""`GET /admin/workers` and the per-queue lines of `/metrics`, on both stacks."""

from __future__ import annotations

import json
import re
from datetime import timedelta

from sqlalchemy import update

from shared import workers
from shared.db import unit_of_work
from shared.estimate import GIB
from shared.models import JobEvent, Worker, utcnow
from tests.conftest import Stack

# A 13B-shaped base: with 2,048-token sequences in batches of 8 it needs the 48g class.
LARGE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def announce(stack: Stack, worker_id: str, queues: list[str], *, age_seconds: float = 0) -> None:
    with unit_of_work(stack.client.app.state.sessions) as session:  # type: ignore[attr-defined]
        workers.register(
            session,
            worker_id=worker_id,
            hostname="gpu-box",
            queues=queues,
            device="cuda:0 NVIDIA L4",
            memory_bytes=23 * GIB,
        )
        session.execute(
            update(Worker)
            .where(Worker.id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=age_seconds))
        )


def metric(text: str, name: str, queue: str) -> float:
    match = re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {name} for {queue} in /metrics"
    return float(match.group(1))


def test_admin_workers_lists_the_fleet_live_and_stale(stack: Stack) -> None:
    stale_after = stack.settings.worker_stale_seconds
    announce(stack, "gpu-box:11", ["cpu", "gpu-24g"])
    announce(stack, "gpu-box:12", ["cpu"], age_seconds=stale_after + 30)
    _, tenant_headers, _ = stack.new_tenant()
    assert stack.client.get("/admin/workers").status_code == 401
    assert stack.client.get("/admin/workers", headers=tenant_headers).status_code == 401
    resp = stack.client.get("/admin/workers", headers=stack.admin)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["has_more"] is False
    fleet = {w["id"]: w for w in body["data"]}  # the services stack's database is shared
    assert {"gpu-box:11", "gpu-box:12"} <= set(fleet)
    live, stale = fleet["gpu-box:11"], fleet["gpu-box:12"]
    assert live["live"] is True and stale["live"] is False
    assert live["queues"] == ["cpu", "gpu-24g"] and live["memory_bytes"] == 23 * GIB
    assert live["device"] == "cuda:0 NVIDIA L4" and live["current_job_id"] is None
    assert live["seconds_since_heartbeat"] < stale_after < stale["seconds_since_heartbeat"]


def test_metrics_show_queue_depth_oldest_age_and_live_workers(stack: Stack) -> None:
    before = stack.client.get("/metrics").text  # the services stack's database is shared
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "large", "source": "org/large", "config": LARGE_CONFIG},
    )
    _, headers, _ = stack.new_tenant()
    row = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    file_id = stack.client.post(
        "/v1/files",
        headers=headers,
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", row.encode() * 4)},
    ).json()["id"]
    resp = stack.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={
            "model": "large",
            "training_file": file_id,
            "qlora": {"batch_size": 16, "max_seq_length": 2048},
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["gpu_class"] == "gpu-48g"
    with unit_of_work(stack.client.app.state.sessions) as session:  # type: ignore[attr-defined]
        session.execute(  # queued ten minutes ago
            update(JobEvent)
            .where(JobEvent.job_id == resp.json()["id"])
            .values(created_at=utcnow() - timedelta(minutes=10))
        )
    announce(stack, "gpu-box:21", ["cpu", "gpu-24g"])
    announce(stack, "gpu-box:22", ["gpu-24g"])
    after = stack.client.get("/metrics").text

    def grew(name: str, queue: str) -> float:
        return metric(after, name, queue) - metric(before, name, queue)

    assert grew("qlora_queue_depth", "gpu-48g") == 1
    assert grew("qlora_queue_depth", "gpu-24g") == 0
    assert 600 <= metric(after, "qlora_queue_oldest_age_seconds", "gpu-48g") < 3600
    assert grew("qlora_queue_live_workers", "gpu-24g") == 2
    assert grew("qlora_queue_live_workers", "cpu") == 1
    assert grew("qlora_queue_live_workers", "gpu-48g") == 0
