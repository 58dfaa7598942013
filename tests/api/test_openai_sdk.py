"""The official `openai` SDK, strict response validation on, against the API served by uvicorn
(both stacks, no worker): every error class it maps a status to, with OpenAI's `type`, our
`code` and the `param` to blame, and the `metadata[key]=value` list filter with pagination."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from tests.api.test_jobs_api import TINY_CONFIG
from tests.conftest import Stack
from tests.harness.processes import free_port


@dataclass
class Sdk:
    url: str
    stack: Stack

    def client(self, api_key: str) -> OpenAI:
        return OpenAI(
            base_url=f"{self.url}/v1",
            api_key=api_key,
            max_retries=0,
            _strict_response_validation=True,
        )

    def tenant(self, name: str, **limits: int) -> tuple[OpenAI, str]:
        """A tenant's client and the id of a fine-tune file it uploaded through the SDK."""
        admin = self.stack.admin
        resp = self.stack.client.post(
            "/admin/tenants", json={"name": name, **limits}, headers=admin
        )
        tenant_id = resp.json()["id"]
        key = self.stack.client.post(f"/admin/tenants/{tenant_id}/keys", headers=admin).json()
        client = self.client(key["key"])
        rows = (json.dumps({"prompt": "a", "completion": "b"}) + "\n").encode() * 4
        uploaded = client.files.create(file=("train.jsonl", rows), purpose="fine-tune")
        return client, uploaded.id


@pytest.fixture
def sdk(stack: Stack) -> Iterator[Sdk]:
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny", "source": "org/tiny", "config": TINY_CONFIG},
    )
    port = free_port()
    config = uvicorn.Config(
        stack.client.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Sdk(f"http://127.0.0.1:{port}", stack)
    server.should_exit = True
    thread.join(timeout=10)


def raised(
    cls: type[openai.APIStatusError], call: Any, *args: Any, **kwargs: Any
) -> openai.APIStatusError:
    with pytest.raises(cls) as caught:
        call(*args, **kwargs)
    return caught.value


def test_each_status_raises_the_sdk_class_with_type_code_and_param(sdk: Sdk) -> None:
    client, file_id = sdk.tenant("acme", max_queued_jobs=2)
    other, _ = sdk.tenant("other")

    bad_body = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.create,
        model="tiny",
        training_file=file_id,
        suffix="has space",
    )
    assert (bad_body.status_code, bad_body.type) == (400, "invalid_request_error")
    assert (bad_body.code, bad_body.param) == ("invalid_value", "suffix")
    assert "suffix" in bad_body.message

    bad_metadata = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.create,
        model="tiny",
        training_file=file_id,
        metadata={"k": 1},  # type: ignore[dict-item,unused-ignore]
    )
    assert (bad_metadata.code, bad_metadata.param) == ("invalid_metadata", "metadata")

    bad_filter = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.list,
        extra_query={"metadata[team][x]": "a"},
    )
    assert (bad_filter.code, bad_filter.param) == ("invalid_value", "metadata[team][x]")
    assert bad_filter.type == "invalid_request_error"

    bad_key = raised(openai.AuthenticationError, sdk.client("sk-wrong").fine_tuning.jobs.list)
    assert (bad_key.status_code, bad_key.type) == (401, "invalid_request_error")
    assert (bad_key.code, bad_key.param) == ("invalid_api_key", None)

    missing_file = raised(openai.NotFoundError, client.files.retrieve, "file-missing")
    assert (missing_file.type, missing_file.code) == ("invalid_request_error", "not_found")
    assert missing_file.param == "file_id"
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    not_theirs = raised(openai.NotFoundError, other.fine_tuning.jobs.retrieve, job.id)
    assert (not_theirs.code, not_theirs.param) == ("not_found", "fine_tuning_job_id")

    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    finished = raised(openai.ConflictError, client.fine_tuning.jobs.cancel, job.id)
    assert (finished.status_code, finished.type) == (409, "invalid_request_error")
    assert (finished.code, finished.param) == ("job_not_cancellable", "fine_tuning_job_id")

    for _ in range(2):
        client.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    limited = raised(
        openai.RateLimitError, client.fine_tuning.jobs.create, model="tiny", training_file=file_id
    )
    assert (limited.status_code, limited.type, limited.code) == (
        429,
        "requests",
        "rate_limit_exceeded",
    )
    assert limited.response.headers["retry-after"]


def test_list_filters_by_metadata_and_pages_within_the_filter(sdk: Sdk) -> None:
    client, file_id = sdk.tenant("acme")
    other, other_file = sdk.tenant("other")
    other.fine_tuning.jobs.create(model="tiny", training_file=other_file, metadata={"team": "a"})

    def create(metadata: dict[str, str] | None) -> str:
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, metadata=metadata)
        return job.id

    # Oldest first; the list is newest first.
    odd_key = 'a "quoted" k\\ey é'
    ids = [
        create({"team": "a", "env": "prod"}),
        create({"team": "b", "env": "prod"}),
        create(None),
        create({"team": "a", "env": "dev", odd_key: "ü"}),
        create({"team": "a", "env": "prod"}),
        create({"team": "ab"}),
    ]
    newest = ids[::-1]

    def listed(**kwargs: Any) -> tuple[list[str], bool]:
        page = client.fine_tuning.jobs.list(**kwargs)
        return [j.id for j in page.data], bool(page.has_more)

    team_a = [newest[1], newest[2], newest[5]]
    assert listed(metadata={"team": "a"}) == (team_a, False)
    assert listed(metadata={"team": "a", "env": "prod"}) == ([newest[1], newest[5]], False)
    assert listed(metadata={"team": "a", "env": "staging"}) == ([], False)
    assert listed(metadata={odd_key: "ü"}) == ([newest[2]], False)
    assert listed(metadata={"team": ""}) == ([], False)
    assert listed(metadata={}) == (newest, False)
    assert listed(extra_query={"metadata": "null"}) == ([newest[3]], False)

    # Pagination under the filter: pages of 1, then of exactly the rest.
    assert listed(metadata={"team": "a"}, limit=1) == (team_a[:1], True)
    assert listed(metadata={"team": "a"}, limit=1, after=team_a[0]) == (team_a[1:2], True)
    assert listed(metadata={"team": "a"}, limit=2, after=team_a[0]) == (team_a[1:], False)
    assert listed(metadata={"team": "a"}, limit=3) == (team_a, False)
    # `after` may be a job outside the filter: the page starts below it.
    assert listed(metadata={"team": "a"}, after=newest[0]) == (team_a, False)
    assert listed(metadata={"team": "a"}, after=newest[3]) == (team_a[2:], False)
    pages = client.fine_tuning.jobs.list(metadata={"team": "a"}, limit=1)
    assert [j.id for j in pages] == team_a  # the SDK follows `after` itself

    too_long = raised(
        openai.BadRequestError, client.fine_tuning.jobs.list, metadata={"k" * 65: "v"}
    )
    assert too_long.param == ("metadata[" + "k" * 65)[: len("metadata[]") + 64]
    assert f"{too_long.param}...: metadata keys are at most 64" in too_long.message
    both = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.list,
        extra_query={"metadata": "null", "metadata[team]": "a"},
    )
    assert (both.code, both.param) == ("invalid_value", "metadata")


def test_a_final_conflict_is_not_retried_by_the_sdk(sdk: Sdk) -> None:
    """The SDK retries 409s twice by default; `x-should-retry: false` stops it for conflicts
    that waiting cannot resolve."""
    client, file_id = sdk.tenant("no-retry")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    client.fine_tuning.jobs.cancel(job.id)
    sent: list[str] = []
    retrying = OpenAI(
        base_url=f"{sdk.url}/v1",
        api_key=client.api_key,
        max_retries=2,
        http_client=httpx.Client(event_hooks={"request": [lambda r: sent.append(r.url.path)]}),  # type: ignore[arg-type,unused-ignore]
    )
    with pytest.raises(openai.ConflictError) as info:
        retrying.fine_tuning.jobs.cancel(job.id)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert sent == [f"/v1/fine_tuning/jobs/{job.id}/cancel"]


def test_models_retrieve_and_delete_fine_tuned_models_per_tenant(sdk: Sdk) -> None:
    from sqlalchemy import select

    from shared.models import Adapter, ApiKey
    from shared.tenancy.service import fine_tuned_name, hash_key

    client, _ = sdk.tenant("Acme Corp")
    other, _ = sdk.tenant("other")
    sessions = sdk.stack.client.app.state.sessions  # type: ignore[attr-defined]
    listed = [m.id for m in client.models.list().data]  # base models only so far
    assert "tiny" in listed and not any(i.startswith("ft:") for i in listed)
    assert client.models.retrieve("tiny").owned_by == "system"
    with sessions.begin() as session:  # a finished job's adapter, as the worker records it
        tenant_id = session.scalar(
            select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(client.api_key))
        )
        name = fine_tuned_name(
            base="tiny", slug="acme-corp", suffix=None, adapter_id="ftadapter-" + "a" * 24
        )
        session.add(
            Adapter(
                id="ftadapter-" + "a" * 24,
                tenant_id=tenant_id,
                job_id="ftjob-" + "a" * 24,
                base_model="tiny",
                name=name,
                storage_prefix=f"adapters/{tenant_id}/ftadapter-{'a' * 24}/",
                metrics={},
                spec={},
            )
        )
    assert name == f"ft:tiny:acme-corp::ftadapter-{'a' * 24}"
    model = client.models.retrieve(name)
    assert (model.id, model.owned_by, model.object) == (name, tenant_id, "model")

    missing = raised(openai.NotFoundError, other.models.retrieve, name)  # not theirs
    assert missing.code == "model_not_found"
    assert raised(openai.NotFoundError, other.models.delete, name).code == "model_not_found"
    base = raised(openai.PermissionDeniedError, client.models.delete, "tiny")
    assert (base.status_code, base.code) == (403, "model_not_deletable")
    assert raised(openai.NotFoundError, client.models.retrieve, "no-such-base").status_code == 404

    deleted = client.models.delete(name)
    assert (deleted.id, deleted.deleted) == (name, True)
    assert raised(openai.NotFoundError, client.models.retrieve, name).code == "model_not_found"


def qlora_of(obj: Any) -> dict[str, Any]:
    """The `qlora` extension block of an SDK object (an extra key its types do not know)."""
    block: dict[str, Any] = obj.to_dict()["qlora"]
    return block


def _tenant_id(sdk: Sdk, client: OpenAI) -> str:
    from sqlalchemy import select

    from shared.models import ApiKey
    from shared.tenancy.service import hash_key

    sessions = sdk.stack.client.app.state.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        tenant_id = session.scalar(
            select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(client.api_key))
        )
    assert isinstance(tenant_id, str)
    return tenant_id


def test_auto_hyperparameters_are_resolved_and_reported_with_the_qlora_block(sdk: Sdk) -> None:
    client, file_id = sdk.tenant("auto")  # 4 training rows

    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    hp = job.hyperparameters
    # 4 rows: as many epochs as see ~100 examples, at most 25; a micro-batch of at most 4 rows.
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (25, 4, 1.0)
    assert job.method is not None and job.method.type == "supervised"
    assert job.method.supervised is not None
    assert job.method.supervised.hyperparameters is not None
    assert job.method.supervised.hyperparameters.to_dict() == hp.to_dict()
    qlora = qlora_of(hp)
    assert (qlora["rank"], qlora["alpha"], qlora["target_modules"]) == (16, 32.0, "all-linear")
    assert qlora["num_epochs"] == 25 and "base_model" not in qlora

    given = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}},
        },
        extra_body={"qlora": {"rank": 8, "dropout": 0.1, "batch_size": 2}},
    )
    hp = given.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 2, 0.5)
    assert given.method is not None and given.method.supervised is not None
    assert given.method.supervised.hyperparameters is not None
    assert given.method.supervised.hyperparameters.to_dict() == hp.to_dict()
    assert (qlora_of(hp)["rank"], qlora_of(hp)["dropout"]) == (8, 0.1)
    # qlora wins over the OpenAI name, and the report says what is used.
    lr = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        hyperparameters={"learning_rate_multiplier": 3},
        extra_body={"qlora": {"learning_rate": 1e-3}},
    )
    assert lr.hyperparameters.learning_rate_multiplier == 5.0


def test_integrations_need_the_deployment_to_configure_them(sdk: Sdk) -> None:
    client, file_id = sdk.tenant("tracking")
    wandb = {"type": "wandb", "wandb": {"project": "p", "tags": ["x"]}}
    mlflow = {"type": "mlflow", "mlflow": {"experiment": "e"}}
    for item in (wandb, mlflow):
        refused = raised(
            openai.BadRequestError,
            client.fine_tuning.jobs.create,
            model="tiny",
            training_file=file_id,
            integrations=[item],
        )
        assert (refused.code, refused.param) == ("integration_not_configured", "integrations")
        assert "not configured on this service" in refused.message

    app = sdk.stack.client.app
    configured = app.state.settings.model_copy(  # type: ignore[attr-defined]
        update={"wandb_mode": "offline", "mlflow_tracking_uri": "sqlite:////nonexistent/x.db"}
    )
    app.state.settings = configured  # type: ignore[attr-defined]
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=file_id,
        integrations=[wandb, mlflow],  # type: ignore[list-item]
    )
    assert job.integrations is not None and len(job.integrations) == 1
    assert job.integrations[0].type == "wandb"
    assert job.integrations[0].wandb.project == "p" and job.integrations[0].wandb.tags == ["x"]
    assert job.to_dict()["other_integrations"] == [
        {"type": "mlflow", "mlflow": {"experiment": "e", "run_name": None}}
    ]
    assert client.fine_tuning.jobs.retrieve(job.id).to_dict() == job.to_dict()

    twice = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.create,
        model="tiny",
        training_file=file_id,
        integrations=[wandb, wandb],
    )
    assert twice.param == "integrations" and "once" in twice.message
    no_project = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.create,
        model="tiny",
        training_file=file_id,
        integrations=[{"type": "wandb", "wandb": {}}],  # type: ignore[typeddict-item,unused-ignore]
    )
    assert no_project.param == "integrations.0.wandb.project"


def test_pause_and_resume_through_the_sdk(sdk: Sdk) -> None:
    """No worker: a queued job pauses at once. The SDK's job type does not know status
    "paused", so with strict validation a paused job is read through `with_raw_response`."""
    client, file_id = sdk.tenant("pauser")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    paused = client.fine_tuning.jobs.with_raw_response.pause(job.id).http_response.json()
    assert paused["status"] == "paused"
    with pytest.raises(openai.APIResponseValidationError):  # what strict validation does
        client.fine_tuning.jobs.retrieve(job.id)
    raw = client.fine_tuning.jobs.with_raw_response.retrieve(job.id).http_response.json()
    assert raw["status"] == "paused" and raw["estimated_finish"] is None
    again = client.fine_tuning.jobs.with_raw_response.pause(job.id).http_response.json()
    assert again["status"] == "paused"  # idempotent
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued" and resumed.estimated_finish is None
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"  # idempotent
    client.fine_tuning.jobs.cancel(job.id)
    for call in (client.fine_tuning.jobs.pause, client.fine_tuning.jobs.resume):
        refused = raised(openai.ConflictError, call, job.id)
        assert refused.code in ("job_not_pausable", "job_not_resumable")
    assert raised(openai.NotFoundError, client.fine_tuning.jobs.pause, "ftjob-nope").code == (
        "not_found"
    )


def test_checkpoint_names_retrieve_and_continuing_from_a_model_or_checkpoint(sdk: Sdk) -> None:
    """Checkpoints and adapters as the worker records them; the jobs that continue from them
    are admitted (their training is tests/jobs/test_parity.py's)."""
    from shared.ids import new_id
    from shared.models import Adapter, Checkpoint

    client, file_id = sdk.tenant("Acme Corp")
    other, other_file = sdk.tenant("other")
    tenant_id = _tenant_id(sdk, client)
    sessions = sdk.stack.client.app.state.sessions  # type: ignore[attr-defined]
    source = client.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, suffix="src", extra_body={"qlora": {"rank": 8}}
    )
    client.fine_tuning.jobs.cancel(source.id)
    adapter_id = "ftadapter-" + "b" * 24
    model_name = f"ft:tiny:acme-corp:src:{adapter_id}"
    with sessions.begin() as session:
        for step in (4, 8):
            session.add(
                Checkpoint(
                    id=new_id("checkpoint"),
                    job_id=source.id,
                    tenant_id=tenant_id,
                    step=step,
                    attempt=1,
                    metrics={"step": step, "train_loss": 1.0, "valid_loss": None},
                    storage_prefix=f"checkpoints/{tenant_id}/{source.id}/attempt-1/step-{step}/",
                )
            )
        session.add(
            Adapter(
                id=adapter_id,
                tenant_id=tenant_id,
                job_id=source.id,
                base_model="tiny",
                name=model_name,
                storage_prefix=f"adapters/{tenant_id}/{adapter_id}/",
                metrics={},
                spec={
                    "base_model": "tiny",
                    "rank": 8,
                    "alpha": 32.0,
                    "target_modules": "all-linear",
                },
            )
        )

    checkpoints = client.fine_tuning.jobs.checkpoints.list(source.id).data
    names = [c.fine_tuned_model_checkpoint for c in checkpoints]
    assert names == [f"ft:tiny:acme-corp:src:{source.id}:ckpt-step-{n}" for n in (8, 4)]
    model = client.models.retrieve(names[0])
    assert (model.id, model.owned_by, model.to_dict()["root"]) == (names[0], tenant_id, "tiny")
    for wrong in (
        names[0].replace("ckpt-step-8", "ckpt-step-12"),  # no such step
        names[0].replace("acme-corp", "acme"),  # not the name the checkpoint has
    ):
        assert raised(openai.NotFoundError, client.models.retrieve, wrong).code == (
            "model_not_found"
        )
    assert raised(openai.NotFoundError, other.models.retrieve, names[0]).code == "model_not_found"
    not_deletable = raised(openai.PermissionDeniedError, client.models.delete, names[0])
    assert not_deletable.code == "model_not_deletable"

    for name in (model_name, names[1]):
        job = client.fine_tuning.jobs.create(model=name, training_file=file_id, suffix="more")
        assert job.model == name  # as given
        assert qlora_of(job.hyperparameters)["rank"] == 8  # the source's LoRA shape
        assert qlora_of(job)["base_model"] == "tiny"
        client.fine_tuning.jobs.cancel(job.id)
    mismatch = raised(
        openai.BadRequestError,
        client.fine_tuning.jobs.create,
        model=model_name,
        training_file=file_id,
        extra_body={"qlora": {"rank": 16}},
    )
    assert (mismatch.code, mismatch.param) == ("incompatible_adapter", "qlora.rank")
    same = client.fine_tuning.jobs.create(
        model=names[0], training_file=file_id, extra_body={"qlora": {"rank": 8, "dropout": 0.2}}
    )
    assert qlora_of(same.hyperparameters)["dropout"] == 0.2
    for name in (model_name, names[0], "ft:tiny:acme-corp:src:ftadapter-unknown"):
        theirs = raised(
            openai.NotFoundError,
            other.fine_tuning.jobs.create,
            model=name,
            training_file=other_file,
        )
        assert (theirs.code, theirs.param) == ("model_not_found", "model")
