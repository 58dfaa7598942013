"""Routing to live workers on `make run`: the embedded worker declares the machine's memory and
consumes every class it holds, so a base too big for the `cpu` class runs on it; a job on a
class nobody serves carries the no-live-worker event and shows in `/metrics`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shared.estimate import GIB
from tests.jobs.conftest import FAST_SPEC, addition_rows
from tests.jobs.test_embedded import MakeRun, make_run

pytestmark = [pytest.mark.slow]

# A 13B-shaped base, registered by config only: at 2,048 tokens in batches of 16 it needs the
# 48g class, which a 24 GiB machine does not hold. It never loads.
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


def no_worker_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if (e["data"] or {}).get("code") == "no_live_worker"]


def queue_metric(run: MakeRun, name: str, queue: str) -> float:
    with run.http() as c:
        text = c.get("/metrics").text
    match = re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no {name} for {queue}"
    return float(match.group(1))


def register(run: MakeRun, name: str, **body: Any) -> None:
    with run.http(run.admin) as c:
        resp = c.post("/admin/models", json={"name": name, **body})
    assert resp.status_code == 201, resp.text


def test_make_run_routes_to_the_classes_its_worker_holds(tmp_path: Path) -> None:
    from worker.training.tiny import build_tiny_model

    # ~57M parameters: over the cpu class's limit, so the estimator picks gpu-24g.
    small_gpu_base = build_tiny_model(
        tmp_path / "base-57m",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=9,
        num_attention_heads=12,
        num_key_value_heads=4,
    )
    # The memory a 24 GiB machine declares, whatever this box has.
    with make_run(tmp_path, WORKER_MEMORY_BYTES=str(24 * GIB), WORKER_HEARTBEAT_SECONDS="1") as run:
        worker = run.live_worker("gpu-24g")
        assert worker["queues"] == ["cpu", "gpu-24g"]  # auto: cpu and the classes 24 GiB holds
        assert worker["device"] == "cpu" and worker["memory_bytes"] == 24 * GIB
        register(run, "base-57m", source=str(small_gpu_base))
        register(run, "large", source="example/large-13b", config=LARGE_CONFIG)
        auth = run.new_tenant("router")
        file_id = run.upload(auth, addition_rows(40, seed=41))

        runs_here = run.submit(
            auth,
            {
                "model": "base-57m",
                "training_file": file_id,
                "qlora": {
                    **FAST_SPEC,
                    "max_steps": 2,
                    "batch_size": 2,
                    "max_seq_length": 32,
                    "checkpoint_steps": None,
                },
            },
        )
        assert runs_here["gpu_class"] == "gpu-24g"
        unserved = run.submit(
            auth,
            {
                "model": "large",
                "training_file": file_id,
                "qlora": {"batch_size": 16, "max_seq_length": 2048},
            },
        )
        assert unserved["gpu_class"] == "gpu-48g"

        done = run.wait_for_job(
            auth, runs_here["id"], lambda j: j["status"] in ("succeeded", "failed")
        )
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"]["step"] == 2
        assert no_worker_events(run.events(auth, runs_here["id"])) == []

        assert run.job(auth, unserved["id"])["status"] == "queued"
        assert queue_metric(run, "qlora_queue_depth", "gpu-48g") == 1
        assert queue_metric(run, "qlora_queue_live_workers", "gpu-48g") == 0
        assert queue_metric(run, "qlora_queue_live_workers", "gpu-24g") == 1
        assert queue_metric(run, "qlora_queue_oldest_age_seconds", "gpu-48g") > 0

        # From here on, the lead's wiring: create_job's note_admission (or the sweeper's
        # flag_unserved_jobs) records the event; admission is stored in the job's estimate.
        flagged = run.wait(
            "the no-live-worker event",
            lambda: no_worker_events(run.events(auth, unserved["id"])),
            timeout=60,
        )
        assert len(flagged) == 1 and flagged[0]["level"] == "warn"
        assert flagged[0]["data"]["queue"] == "gpu-48g"
        assert "WORKER_QUEUES=gpu-48g" in flagged[0]["message"]
        admitted = run.job(auth, unserved["id"])["estimate"]["admission"]
        assert admitted["live_workers"] == 0 and "gpu-48g" in admitted["note"]
        assert run.job(auth, runs_here["id"])["estimate"]["admission"]["live_workers"] == 1

        with run.http(auth) as c:
            assert c.post(f"/v1/fine_tuning/jobs/{unserved['id']}/cancel").status_code == 200
