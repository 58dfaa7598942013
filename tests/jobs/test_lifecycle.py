"""A job's whole life through real processes: submit, train, stream, download, reload."""

from __future__ import annotations

import io
import json
import math
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs.conftest import FAST_SPEC, ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker(stack: ServiceStack) -> Iterator[None]:
    proc = stack.start_worker()
    yield
    stop(proc)


@pytest.fixture(scope="module")
def finished(stack: ServiceStack, worker: None) -> dict[str, Any]:
    """One tenant's succeeded job, shared by the tests that read its results."""
    headers = stack.new_tenant("owner")
    file_id = stack.upload(headers, addition_rows(160, seed=1))
    job = stack.submit(headers, file_id)
    done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", json.dumps(done)
    return {"headers": headers, "job": done, "file_id": file_id}


def test_job_succeeds_and_its_adapter_reproduces_the_recorded_eval_loss(
    stack: ServiceStack, finished: dict[str, Any], base_model_dir: Path, tmp_path: Path
) -> None:
    headers, job = finished["headers"], finished["job"]
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job"
    # OpenAI's shape: ft:{base}:{organization}:{suffix}:{id}
    assert job["fine_tuned_model"] == f"ft:tiny-llama:owner:test:{job['adapter_id']}"
    assert job["attempt"] == 1 and job["trained_tokens"] > 0 and job["finished_at"]
    assert job["progress"]["step"] == job["progress"]["total_steps"] == FAST_SPEC["max_steps"]
    with stack.http(headers) as c:
        adapter = c.get(f"/v1/adapters/{job['adapter_id']}").json()
        assert adapter["name"] == job["fine_tuned_model"]
        assert adapter["metrics"]["eval_loss_after"] < adapter["metrics"]["eval_loss_before"]
        # "auto" activation checkpointing: the tiny run fits the worker's RAM, so it is off
        assert adapter["metrics"]["gradient_checkpointing"] is False
        assert adapter["metrics"]["gradient_checkpointing_reason"].startswith("auto: the run fits")
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models == ["tiny-llama", job["fine_tuned_model"]]
        archive = c.get(f"/v1/adapters/{job['adapter_id']}/download")
        assert archive.status_code == 200
        redirect = c.get(f"/v1/adapters/{job['adapter_id']}/download", params={"redirect": True})
        assert redirect.status_code == 307
        assert "X-Amz-Expires=900" in redirect.headers["location"]
        assert httpx.get(redirect.headers["location"]).content == archive.content
        content = c.get(f"/v1/files/{finished['file_id']}/content").content
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.json", "README.md"} <= {
        p.name for p in folder.iterdir()
    }
    # Load it the standard way on the same NF4 base and evaluate the same held-out rows.
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training

    from shared.train_spec import TrainSpec
    from worker.training.loop import prepare_data
    from worker.training.model import evaluate, load_base_model, load_tokenizer

    spec = TrainSpec(**job["qlora"])
    data_path = tmp_path / "train.jsonl"
    data_path.write_bytes(content)
    tokenizer = load_tokenizer(base_model_dir)
    batches = prepare_data(spec, tokenizer, data_path, None).eval_batches
    base = prepare_model_for_kbit_training(
        load_base_model(spec, base_model_dir, torch.device("cpu")),
        use_gradient_checkpointing=False,
    )
    model = PeftModel.from_pretrained(base, folder)
    loss = evaluate(model, batches, torch.device("cpu"))
    assert loss is not None
    assert math.isclose(loss, adapter["metrics"]["eval_loss_after"], rel_tol=1e-4)
    assert math.isclose(loss, job["progress"]["eval_loss"], rel_tol=1e-4)


def test_events_checkpoints_and_metrics(stack: ServiceStack, finished: dict[str, Any]) -> None:
    headers, job = finished["headers"], finished["job"]
    events = stack.events(headers, job["id"])
    assert all(e["object"] == "fine_tuning.job.event" for e in events)
    statuses = [e["data"]["status"] for e in events if e["data"] and "from" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "loss" in e["data"]]
    assert steps[0] == 1 and steps[-1] == FAST_SPEC["max_steps"] and steps == sorted(steps)
    with stack.http(headers) as c:
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()
        assert ckpts["object"] == "list"
        # every checkpoint_steps, newest first; the final step leaves the adapter instead
        assert [k["step_number"] for k in ckpts["data"]] == [8, 4]
        first = ckpts["data"][0]
        assert first["object"] == "fine_tuning.job.checkpoint"
        assert first["fine_tuning_job_id"] == job["id"] and first["metrics"]["train_loss"] > 0
        tar = c.get(first["download_url"])
        assert tar.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(tar.content)) as archive:
            names = archive.getnames()
        assert any(n.endswith("manifest.json") for n in names), names
        series = c.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()
        assert series["step"][0] == 1 and len(series["loss"]) == len(series["step"])
        assert [e["step"] for e in series["eval"]][-1] == FAST_SPEC["max_steps"]
        page = c.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
        assert page["data"][0]["id"] == job["id"] and page["object"] == "list"


def test_other_tenant_sees_404_everywhere(stack: ServiceStack, finished: dict[str, Any]) -> None:
    job = finished["job"]
    intruder = stack.new_tenant("intruder")
    with stack.http(finished["headers"]) as c:
        ckpt = c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][0]
    paths = [
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/metrics"),
        ("GET", ckpt["download_url"]),
        ("GET", f"/v1/adapters/{job['adapter_id']}"),
        ("GET", f"/v1/adapters/{job['adapter_id']}/download"),
        ("GET", f"/v1/adapters/{job['adapter_id']}/download?redirect=true"),
        ("DELETE", f"/v1/adapters/{job['adapter_id']}"),
    ]
    with stack.http(intruder) as c:
        for method, path in paths:
            resp = c.request(method, path)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "not_found"
        sse = c.get(
            f"/v1/fine_tuning/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
        )
        assert sse.status_code == 404
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert c.get("/v1/adapters").json()["data"] == []
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llama"]
        # the intruder cannot train on the owner's file either
        resp = c.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-llama", "training_file": finished["file_id"]},
        )
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "training_file"


def read_sse(resp: httpx.Response, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    events: list[tuple[int, dict[str, Any]]] = []
    seq, data, kind = None, None, None
    for line in resp.iter_lines():
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "":
            if kind == "done":
                break
            if seq is not None and data is not None:
                events.append((seq, data))
                if limit is not None and len(events) >= limit:
                    break
            seq, data, kind = None, None, None
    return events


def test_sse_streams_live_and_resumes_after_reconnect(stack: ServiceStack, worker: None) -> None:
    headers = stack.new_tenant("watcher")
    file_id = stack.upload(headers, addition_rows(160, seed=2))
    job = stack.submit(headers, file_id, max_steps=16)
    url = f"/v1/fine_tuning/jobs/{job['id']}/events"
    sse_headers = {**headers, "Accept": "text/event-stream"}
    with stack.http() as c:
        with c.stream("GET", url, headers=sse_headers) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            first = read_sse(resp, limit=4)
        last = first[-1][0]
        with c.stream("GET", url, headers={**sse_headers, "Last-Event-ID": str(last)}) as resp:
            rest = read_sse(resp)
    seen = [seq for seq, _ in first + rest]
    assert len(seen) == len(set(seen)), "an event was repeated"
    stored = stack.events(headers, job["id"])
    assert [int(e["id"].removeprefix("ftevent-")) for e in stored] == seen, "an event was lost"
    assert rest[-1][1]["data"]["status"] == "succeeded"
    assert any(e["type"] == "metrics" for _, e in rest)


def test_cancel_queued_and_running_jobs(stack: ServiceStack, worker: None) -> None:
    headers = stack.new_tenant("canceller")
    file_id = stack.upload(headers, addition_rows(160, seed=3))
    running = stack.submit(headers, file_id, max_steps=400, checkpoint_steps=None)
    queued = stack.submit(headers, file_id)  # one worker: this one waits its turn
    stack.wait_for(headers, running["id"], lambda j: j["progress"]["step"] >= 2)
    with stack.http(headers) as c:
        resp = c.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
        resp = c.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "running"
    done = stack.wait_for(headers, running["id"], lambda j: j["status"] != "running", timeout=60)
    assert done["status"] == "cancelled" and done["progress"]["step"] < 400
    assert done["adapter_id"] is None and done["fine_tuned_model"] is None
    with stack.http(headers) as c:
        again = c.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"
        assert c.get("/v1/adapters").json()["data"] == []
    # The worker survives a cancel and its queue moves on; the cancelled job never ran.
    after = stack.submit(headers, file_id, max_steps=4, checkpoint_steps=2)
    assert stack.wait_for(headers, after["id"], lambda j: j["status"] == "succeeded")
    assert stack.job(headers, queued["id"])["attempt"] == 0


def test_twenty_concurrent_identical_submissions_create_one_job(
    stack: ServiceStack, worker: None
) -> None:
    headers = stack.new_tenant("retrier")
    file_id = stack.upload(headers, addition_rows(40, seed=4))
    body = {
        "model": "tiny-llama",
        "training_file": file_id,
        "qlora": {**FAST_SPEC, "max_steps": 2, "checkpoint_steps": 1},
    }
    key = {"Idempotency-Key": "submit-once-1"}
    results: list[httpx.Response] = []
    barrier = threading.Barrier(20)

    def submit() -> None:
        with stack.http({**headers, **key}) as c:
            barrier.wait()
            results.append(c.post("/v1/fine_tuning/jobs", json=body))

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status_code == 200]
    assert ok and all(r.status_code in (200, 409) for r in results), [r.text for r in results]
    assert len({r.json()["id"] for r in ok}) == 1
    with stack.http(headers) as c:
        jobs = c.get("/v1/fine_tuning/jobs").json()["data"]
        assert len(jobs) == 1
        replay = c.post("/v1/fine_tuning/jobs", json=body, headers=key)
        assert replay.status_code == 200 and replay.json()["id"] == jobs[0]["id"]
        other = c.post("/v1/fine_tuning/jobs", json={**body, "suffix": "x"}, headers=key)
        assert other.status_code == 400
        assert other.json()["error"]["code"] == "idempotency_key_reused"
    stack.wait_for(headers, jobs[0]["id"], lambda j: j["status"] == "succeeded")


def test_duplicate_delivery_trains_once(stack: ServiceStack, worker: None) -> None:
    from shared.broker import JobPublisher, make_celery

    headers = stack.new_tenant("dupes")
    file_id = stack.upload(headers, addition_rows(40, seed=5))
    job = stack.submit(headers, file_id, max_steps=6, checkpoint_steps=3)
    publish = JobPublisher(make_celery(stack.settings))
    for _ in range(2):
        publish(job["id"], "cpu")
    second = stack.start_worker()  # two consumers race for the three messages
    try:
        done = stack.wait_for(headers, job["id"], lambda j: j["status"] == "succeeded")
        stack.wait_for(headers, job["id"], lambda j: stack.broker().llen("cpu") == 0, timeout=60)
    finally:
        stop(second)
    assert done["attempt"] == 1
    events = stack.events(headers, job["id"])
    assert sum(1 for e in events if (e["data"] or {}).get("status") == "running") == 1
    assert sum(1 for e in events if (e["data"] or {}).get("status") == "succeeded") == 1
    with stack.http(headers) as c:
        assert len(c.get("/v1/adapters").json()["data"]) == 1


def test_openai_sdk_walkthrough(stack: ServiceStack, worker: None, tmp_path: Path) -> None:
    from openai import OpenAI

    headers = stack.new_tenant("sdk")
    client = OpenAI(base_url=f"{stack.url}/v1", api_key=headers["Authorization"][7:], max_retries=0)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(80, seed=6)))
    uploaded = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.status == "processed"
    assert client.files.retrieve(uploaded.id).bytes == path.stat().st_size
    assert client.files.content(uploaded.id).content == path.read_bytes()
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        },
        suffix="sdk",
        seed=7,
        metadata={"team": "search"},
        extra_body={"qlora": {**FAST_SPEC, "max_steps": 6, "checkpoint_steps": 3}},
    )
    assert job.status == "queued" and job.seed == 7 and job.metadata == {"team": "search"}
    assert client.fine_tuning.jobs.list(limit=5).data[0].id == job.id
    import time

    deadline = time.monotonic() + 240
    while (current := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.3)
    assert current.status == "succeeded", current
    assert current.fine_tuned_model and current.fine_tuned_model.startswith(
        "ft:tiny-llama:sdk:sdk:"
    )
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message.startswith("Job succeeded") and events[0].level == "info"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [3]
    assert checkpoints[0].fine_tuning_job_id == job.id
    assert current.fine_tuned_model in [m.id for m in client.models.list().data]
    victim = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
    cancelled = client.fine_tuning.jobs.cancel(victim.id)
    assert cancelled.status in ("cancelled", "running")
    final = stack.wait_for(
        headers,
        victim.id,
        lambda j: j["status"] != "running" and j["status"] != "queued",
        timeout=120,
    )
    assert final["status"] == "cancelled"
    # The fine-tuned model through models.retrieve / models.delete: deleting it removes the
    # adapter's record, its objects and its model entry.
    adapter_id = stack.job(headers, job.id)["adapter_id"]
    model = client.models.retrieve(current.fine_tuned_model)
    assert (model.id, model.owned_by) == (current.fine_tuned_model, current.organization_id)
    assert client.models.retrieve("tiny-llama").owned_by == "system"
    deleted = client.models.delete(current.fine_tuned_model)
    assert deleted.deleted is True and deleted.id == current.fine_tuned_model
    with stack.http(headers) as c:
        assert c.get(f"/v1/adapters/{adapter_id}").status_code == 404
        assert c.get(f"/v1/adapters/{adapter_id}/download").status_code == 404
    assert current.fine_tuned_model not in [m.id for m in client.models.list().data]
    from shared.storage import make_store

    store = make_store(stack.settings)
    tenant_id = current.organization_id
    assert store.list_keys(f"adapters/{tenant_id}/{adapter_id}") == []


def test_a_job_that_cannot_train_fails_once_with_the_reason(
    stack: ServiceStack, worker: None
) -> None:
    headers = stack.new_tenant("bad-data")
    rows = [{"prompt": "x" * 60 + str(i), "completion": "y"} for i in range(20)]
    file_id = stack.upload(headers, rows)  # valid JSONL, but no completion fits in 8 tokens
    job = stack.submit(headers, file_id, max_seq_length=8)
    done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("failed", "succeeded"))
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == "invalid_training_data"
    message = done["error"]["message"]
    assert "max_seq_length" in message and "training file" in message
    assert "/" not in message and "Error" not in message  # no path, no exception class
    assert done["adapter_id"] is None and done["finished_at"] is not None
    events = stack.events(headers, job["id"])
    assert events[-1]["level"] == "error" and events[-1]["message"].startswith("Job failed")


def test_rows_the_base_models_template_cannot_render_fail_the_job_by_line_before_a_step(
    stack: ServiceStack, worker: None, base_model_dir: Path, tmp_path: Path
) -> None:
    """A Gemma-style template refuses system messages: the job fails at its start, before any
    training step, naming the lines (tenant-safe: no path, no exception class)."""
    import shutil

    from shared.db import session_scope
    from shared.tenancy import service as tenancy
    from tests.training.test_templates import GEMMA, byte_tokenizer

    model_dir = tmp_path / "gemma-like"
    shutil.copytree(base_model_dir, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    byte_tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>"]).save_pretrained(model_dir)
    with session_scope(stack.settings) as session:
        tenancy.register_model(session, name="gemma-like", source=str(model_dir))
    headers = stack.new_tenant("template")
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "system", "content": "be brief"}, *ok["messages"]]}
    file_id = stack.upload(headers, [ok, bad, ok, bad, *[ok] * 8])
    body = {
        "model": "gemma-like",
        "training_file": file_id,
        "qlora": {**FAST_SPEC, "validation_fraction": 0.0},
    }
    with stack.http(headers) as c:
        resp = c.post("/v1/fine_tuning/jobs", json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("failed", "succeeded"))
    assert done["status"] == "failed" and done["attempt"] == 1
    assert done["error"]["code"] == "invalid_training_data"
    assert (
        "2 row(s) cannot be rendered: training file: lines 2, 4: the base model's chat "
        in (done["error"]["message"])
    )
    assert "System role not supported" in done["error"]["message"]
    events = stack.events(headers, job["id"])
    assert not [e for e in events if e["type"] == "metrics"]  # not one step
