"""Jobs API admission, limits, idempotency and reads, without a worker (both stacks)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select

from shared.jobs.idempotency import request_hash
from shared.jobs.schemas import JobCreate
from shared.models import IdempotencyKey, Job, OutboxMessage
from tests.conftest import Stack

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "qlora_chat_template": False,
}
HUGE_CONFIG = {
    **TINY_CONFIG,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


@pytest.fixture
def tenant(stack: Stack) -> dict[str, Any]:
    for name, config in (("tiny", TINY_CONFIG), ("huge", HUGE_CONFIG)):
        stack.client.post(
            "/admin/models",
            headers=stack.admin,
            json={"name": name, "source": f"org/{name}", "config": config},
        )
    resp = stack.client.post(
        "/admin/tenants", headers=stack.admin, json={"name": "t", "max_queued_jobs": 3}
    )
    tenant_id = resp.json()["id"]
    key = stack.client.post(f"/admin/tenants/{tenant_id}/keys", headers=stack.admin).json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    files = {}
    for fmt, row in (
        ("completion", {"prompt": "a", "completion": "b"}),
        ("text", {"text": "hello"}),
        (
            "chat",
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
        ),
    ):
        body = (json.dumps(row) + "\n").encode() * 4
        files[fmt] = stack.client.post(
            "/v1/files",
            headers=headers,
            data={"purpose": "fine-tune"},
            files={"file": (f"{fmt}.jsonl", body)},
        ).json()["id"]
    return {"id": tenant_id, "headers": headers, "files": files}


def submit(
    stack: Stack, tenant: dict[str, Any], extra_headers: dict[str, str] | None = None, **body: Any
):  # type: ignore[no-untyped-def]
    payload = {"model": "tiny", "training_file": tenant["files"]["completion"], **body}
    return stack.client.post(
        "/v1/fine_tuning/jobs", json=payload, headers={**tenant["headers"], **(extra_headers or {})}
    )


def test_submit_returns_an_openai_job_and_writes_one_outbox_row(stack: Stack, tenant: Any) -> None:
    resp = submit(
        stack,
        tenant,
        suffix="s1",
        seed=5,
        metadata={"k": "v"},
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
        qlora={"rank": 8, "max_seq_length": 256},
    )
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["organization_id"] == tenant["id"] and job["seed"] == 5
    assert job["qlora"]["num_epochs"] == 2 and job["qlora"]["batch_size"] == 8
    assert job["qlora"]["learning_rate"] == pytest.approx(1e-4) and job["qlora"]["rank"] == 8
    assert job["qlora"]["base_model"] == "tiny" and job["gpu_class"] == "cpu"
    assert job["estimate"]["total_bytes"] > 0 and job["metadata"] == {"k": "v"}
    assert job["hyperparameters"]["n_epochs"] == 2 and job["method"]["type"] == "supervised"
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job["id"])).all()
        assert [(r.queue, r.sent_at is not None) for r in rows] == [("cpu", True)]
    events = stack.client.get(
        f"/v1/fine_tuning/jobs/{job['id']}/events", headers=tenant["headers"]
    ).json()
    assert events["object"] == "list"
    statuses = [e["data"]["status"] for e in events["data"] if "status" in e["data"]]
    assert statuses == ["queued"]
    # No worker runs in this stack: admission says so in the estimate and in one event.
    assert job["estimate"]["admission"]["live_workers"] == 0
    assert [e["data"]["code"] for e in events["data"] if "code" in e["data"]] == ["no_live_worker"]


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "nope"}, 404, "model", "model_not_found"),
        ({"training_file": "file-missing"}, 404, "training_file", "not_found"),
        ({"validation_file": "file-missing"}, 404, "validation_file", "not_found"),
        ({"qlora": {"rank": 0}}, 400, "qlora.rank", "invalid_value"),
        ({"qlora": {"dropout": 1.5}}, 400, "qlora.dropout", "invalid_value"),
        ({"qlora": {"learning_rate": -1}}, 400, "qlora.learning_rate", "invalid_value"),
        ({"qlora": {"bogus": 1}}, 400, "qlora.bogus", "invalid_value"),
        ({"qlora": {"base_model": "x"}}, 400, "qlora.base_model", "invalid_value"),
        (
            {"qlora": {"max_tokens_per_batch": 64, "max_seq_length": 256}},
            400,
            "qlora.max_tokens_per_batch",
            "invalid_value",
        ),
        (
            {"qlora": {"max_tokens_per_batch": 4096, "packing": False}},
            400,
            "qlora.max_tokens_per_batch",
            "invalid_value",
        ),
        (
            {"qlora": {"gradient_checkpointing": "maybe"}},
            400,
            "qlora.gradient_checkpointing",
            "invalid_value",
        ),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "invalid_value"),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"batch_size": 0}},
                }
            },
            400,
            "method.supervised.hyperparameters.batch_size",
            "invalid_value",
        ),
        (
            {"hyperparameters": {"n_epochs": "lots"}},
            400,
            "hyperparameters.n_epochs",
            "invalid_value",
        ),
        ({"surprise": True}, 400, "surprise", "invalid_value"),
        ({"suffix": "has space"}, 400, "suffix", "invalid_value"),
        ({"method": {"type": "reinforcement"}}, 400, "method.type", "invalid_value"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    stack: Stack, tenant: Any, body: dict[str, Any], status: int, param: str, code: str
) -> None:
    resp = submit(stack, tenant, **body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert (
        error["param"] == param
        and error["code"] == code
        and param.split(".")[-1] in error["message"]
    )
    assert stack.client.get("/v1/fine_tuning/jobs", headers=tenant["headers"]).json()["data"] == []


def test_format_mismatch_and_chat_without_template_are_refused(stack: Stack, tenant: Any) -> None:
    resp = submit(stack, tenant, validation_file=tenant["files"]["text"])
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "validation_file"
    resp = submit(stack, tenant, training_file=tenant["files"]["chat"])
    assert resp.status_code == 400 and "chat template" in resp.json()["error"]["message"]


def test_a_job_no_gpu_can_hold_is_400_with_the_estimate(stack: Stack, tenant: Any) -> None:
    resp = submit(
        stack,
        tenant,
        model="huge",
        qlora={"max_seq_length": 131072, "batch_size": 64, "gradient_checkpointing": False},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "exceeds_gpu_memory" and error["estimate"]["total_bytes"] > 80 * 2**30
    estimate = stack.client.post(
        "/v1/estimates",
        headers=tenant["headers"],
        json={
            "model": "huge",
            "training_file": tenant["files"]["completion"],
            "qlora": {"max_seq_length": 1024, "batch_size": 1},
        },
    ).json()
    assert estimate["fits"] is True and estimate["queue"] in ("gpu-48g", "gpu-80g")
    assert estimate["parts"]["quantized_weights_bytes"] > 30 * 2**30
    assert stack.client.get("/v1/fine_tuning/jobs", headers=tenant["headers"]).json()["data"] == []


def test_queued_limit_is_429_with_retry_after(stack: Stack, tenant: Any) -> None:
    def queued_gauge() -> float:
        scrape = stack.client.get("/metrics").text
        assert "qlora_outbox_unsent" in scrape and 'qlora_jobs{status="running"}' in scrape
        line = next(x for x in scrape.splitlines() if x.startswith('qlora_jobs{status="queued"}'))
        return float(line.split()[-1])

    before = queued_gauge()  # the services stack's database is shared by the session's tests
    for _ in range(3):
        assert submit(stack, tenant).status_code == 200
    assert queued_gauge() == before + 3
    resp = submit(stack, tenant)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "30"
    assert resp.json()["error"]["code"] == "rate_limit_exceeded"
    first = stack.client.get("/v1/fine_tuning/jobs?limit=1", headers=tenant["headers"]).json()
    assert first["has_more"] is True
    cancel = stack.client.post(
        f"/v1/fine_tuning/jobs/{first['data'][0]['id']}/cancel", headers=tenant["headers"]
    )
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    assert submit(stack, tenant).status_code == 200  # a freed slot is usable again


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("metadata[]=x", "metadata[]"),
        ("metadata[a=x", "metadata[a"),
        ("metadata[a][b]=x", "metadata[a][b]"),
        ("metadata[a]=1&metadata[a]=2", "metadata[a]"),
        ("metadata=everything", "metadata"),
        ("metadata=null&metadata[a]=1", "metadata"),
    ],
)
def test_a_malformed_metadata_filter_is_400_naming_it(
    stack: Stack, tenant: Any, query: str, param: str
) -> None:
    resp = stack.client.get(f"/v1/fine_tuning/jobs?{query}", headers=tenant["headers"])
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert error["param"] == param and error["message"].startswith(param)


def test_list_paginates_and_cancel_twice_is_409(stack: Stack, tenant: Any) -> None:
    ids = [submit(stack, tenant).json()["id"] for _ in range(3)]
    seen: list[str] = []
    after = None
    while True:
        url = "/v1/fine_tuning/jobs?limit=2" + (f"&after={after}" if after else "")
        page = stack.client.get(url, headers=tenant["headers"]).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = seen[-1]
    assert seen == ids[::-1]
    assert (
        stack.client.post(
            f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=tenant["headers"]
        ).status_code
        == 200
    )
    again = stack.client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=tenant["headers"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"
    events = stack.client.get(
        f"/v1/fine_tuning/jobs/{ids[0]}/events?limit=1", headers=tenant["headers"]
    ).json()
    assert events["has_more"] is True and events["data"][0]["message"] == "Job cancelled"
    older = stack.client.get(
        f"/v1/fine_tuning/jobs/{ids[0]}/events?after={events['data'][0]['id']}",
        headers=tenant["headers"],
    ).json()
    assert [e["data"]["status"] for e in older["data"] if "status" in e["data"]] == ["queued"]


def test_idempotency_replay_mismatch_and_in_flight(stack: Stack, tenant: Any) -> None:
    key = {"Idempotency-Key": "abc"}
    first = submit(stack, tenant, key)
    replay = submit(stack, tenant, key)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert replay.headers["idempotent-replayed"] == "true"
    other = submit(stack, tenant, key, suffix="different")
    assert other.status_code == 400 and other.json()["error"]["code"] == "idempotency_key_reused"
    # a failed request frees its key: the corrected retry runs
    bad = submit(stack, tenant, {"Idempotency-Key": "fix-me"}, qlora={"rank": 0})
    assert bad.status_code == 400
    assert submit(stack, tenant, {"Idempotency-Key": "fix-me"}).status_code == 200
    # keys are per tenant
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        rows = session.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "abc")).all()
        assert len(rows) == 1 and rows[0].tenant_id == tenant["id"]
        # simulate a first request still in flight
        body = JobCreate(model="tiny", training_file=tenant["files"]["completion"])
        session.add(
            IdempotencyKey(
                tenant_id=tenant["id"],
                key="busy",
                request_hash=request_hash(body.model_dump(mode="json")),
                expires_at=rows[0].expires_at,
            )
        )
        session.commit()
    busy = submit(stack, tenant, {"Idempotency-Key": "busy"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_key_in_flight"
    with stack.client.app.state.sessions() as session:  # type: ignore[attr-defined]
        assert len(session.scalars(select(Job).where(Job.tenant_id == tenant["id"])).all()) == 2


def test_adapter_and_checkpoint_reads_of_unknown_ids_are_404(stack: Stack, tenant: Any) -> None:
    job_id = submit(stack, tenant).json()["id"]
    h = tenant["headers"]
    for path in (
        "/v1/adapters/ftadapter-nope",
        "/v1/adapters/ftadapter-nope/download",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints/ftckpt-nope/download",
        "/v1/fine_tuning/jobs/ftjob-nope/metrics",
    ):
        assert stack.client.get(path, headers=h).status_code == 404, path
    assert stack.client.delete("/v1/adapters/ftadapter-nope", headers=h).status_code == 404
    ckpts = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=h).json()
    assert ckpts == {
        "object": "list",
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }
    series = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers=h).json()
    assert series["step"] == [] and series["object"] == "fine_tuning.job.metrics"
    bad = stack.client.get(f"/v1/fine_tuning/jobs/{job_id}/events?after=garbage", headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


def test_deleting_a_finished_job_removes_its_adapter_checkpoints_and_objects(
    stack: Stack, tenant: Any
) -> None:
    from shared.jobs import results, runs
    from shared.models import Adapter, Checkpoint, JobEvent, ObjectDeletion
    from shared.storage import adapter_prefix, results_key

    job = submit(stack, tenant).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    refused = stack.client.delete(url, headers=tenant["headers"])
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_deletable"

    app_state = stack.client.app.state  # type: ignore[attr-defined]
    store, sessions = app_state.store, app_state.sessions
    # As a finished run leaves it: two recorded checkpoints, an unrecorded upload of a stale
    # attempt, and the adapter with its objects.
    prefixes = [runs.checkpoint_prefix(tenant["id"], job["id"], 1, s) for s in (3, 6)]
    stale = runs.checkpoint_prefix(tenant["id"], job["id"], 0, 3)
    with sessions.begin() as session:
        row = session.get(Job, job["id"])
        row.status = "succeeded"
        for i, prefix in enumerate(prefixes):
            session.add(
                Checkpoint(
                    id=f"ckpt-{job['id'][-8:]}-{i}",
                    job_id=row.id,
                    tenant_id=row.tenant_id,
                    step=3 * (i + 1),
                    attempt=1,
                    metrics={},
                    storage_prefix=prefix,
                )
            )
        adapter_id = f"adapter-{job['id'][-10:]}"
        session.add(
            Adapter(
                id=adapter_id,
                tenant_id=row.tenant_id,
                job_id=row.id,
                base_model="tiny",
                name=f"ft:tiny:{adapter_id}",
                storage_prefix=adapter_prefix(row.tenant_id, adapter_id),
                metrics={},
                spec={},
            )
        )
    for prefix in [*prefixes, stale, adapter_prefix(tenant["id"], adapter_id)]:
        store.put_bytes(prefix + "adapter_model.safetensors", b"w" * 100)
    csv_key = results_key(tenant["id"], "file-results1")
    store.put_bytes(csv_key, b"step,train_loss\n1,2.0\n")
    with sessions.begin() as session:
        session.add(
            results.results_file(
                tenant_id=tenant["id"],
                job_id=job["id"],
                file_id="file-results1",
                key=csv_key,
                body=b"step,train_loss\n1,2.0\n",
                rows=1,
            )
        )
        session.get(Job, job["id"]).result_files = ["file-results1"]

    other = stack.client.post(
        "/admin/tenants", headers=stack.admin, json={"name": "someone-else"}
    ).json()["id"]
    other_key = stack.client.post(f"/admin/tenants/{other}/keys", headers=stack.admin).json()
    not_theirs = stack.client.delete(url, headers={"Authorization": f"Bearer {other_key['key']}"})
    assert not_theirs.status_code == 404

    resp = stack.client.delete(url, headers=tenant["headers"])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": job["id"], "object": "fine_tuning.job", "deleted": True}
    assert stack.client.get(url, headers=tenant["headers"]).status_code == 404
    assert (
        stack.client.get(f"/v1/adapters/{adapter_id}", headers=tenant["headers"]).status_code == 404
    )
    assert store.list_keys(f"checkpoints/{tenant['id']}/") == []
    assert store.list_keys(adapter_prefix(tenant["id"], adapter_id)) == []
    assert not store.exists(csv_key)
    assert stack.client.get("/v1/files/file-results1", headers=tenant["headers"]).status_code == 404
    with sessions() as session:
        for model in (Checkpoint, JobEvent, OutboxMessage):
            assert session.scalars(select(model).where(model.job_id == job["id"])).all() == []
        assert session.scalars(select(ObjectDeletion)).all() == []  # drained after the commit
    assert stack.client.delete(url, headers=tenant["headers"]).status_code == 404
