"""DPO end to end through the official `openai` SDK (strict response validation) against the
running stack: upload preference rows, create a `method.type = "dpo"` job, pause it mid-run and
resume it, watch it succeed with the DPO figures in its events and checkpoints, and load the
downloaded adapter with PEFT on the 4-bit base."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.conftest import FAST_SPEC, ServiceStack, stop
from tests.training.test_dpo import preference_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEPS = 30  # enough steps left after the pause request for the worker to see it


@pytest.fixture(scope="module")
def worker(stack: ServiceStack) -> Iterator[None]:
    proc = stack.start_worker()
    yield
    stop(proc)


def wait(client: Any, job_id: str, statuses: tuple[str, ...], stack: ServiceStack) -> Any:
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.2)
    return job


def test_dpo_job_through_the_sdk_pauses_resumes_succeeds_and_loads_with_peft(
    stack: ServiceStack, worker: None, base_model_dir: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    headers = stack.new_tenant("dpo")
    client = OpenAI(
        base_url=f"{stack.url}/v1",
        api_key=headers["Authorization"][7:],
        max_retries=0,
        _strict_response_validation=True,
    )
    body = "".join(json.dumps(r) + "\n" for r in preference_rows(40, seed=3)).encode()
    uploaded = client.files.create(file=("prefs.jsonl", body), purpose="fine-tune")
    assert uploaded.status == "processed"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 4}}},
        suffix="prefs",
        extra_body={
            "qlora": {**FAST_SPEC, "max_steps": STEPS, "checkpoint_steps": 10, "dropout": 0.1}
        },
    )
    assert job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None
    assert job.method.dpo.hyperparameters.beta == 0.1

    # pause mid-run: the worker checkpoints and lets go; resume continues from there
    deadline = time.monotonic() + 300
    while client.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"] < 2:  # type: ignore[index]
        assert time.monotonic() < deadline, stack.tail_logs()
        time.sleep(0.1)
    client.fine_tuning.jobs.pause(job.id)
    # (read over HTTP: the SDK's strict models do not know the status "paused")
    paused = stack.wait_for(headers, job.id, lambda j: j["status"] not in ("queued", "running"))
    assert paused["status"] == "paused", paused
    assert 2 <= paused["progress"]["step"] < STEPS
    client.fine_tuning.jobs.resume(job.id)
    done = wait(client, job.id, ("succeeded", "failed", "cancelled"), stack)
    assert done.status == "succeeded", done
    assert done.method.type == "dpo" and done.fine_tuned_model

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data[::-1]
    assert any(e.message.startswith("Resuming from checkpoint") for e in events)
    steps = [e.data for e in events if e.type == "metrics" and "reward_margin" in (e.data or {})]
    assert steps and steps[-1]["step"] == STEPS
    for data in steps:
        assert {"chosen_reward", "rejected_reward", "preference_accuracy"} <= set(data)
        assert data["reward_margin"] == pytest.approx(
            data["chosen_reward"] - data["rejected_reward"], abs=1e-6
        )
    assert steps[-1]["preference_accuracy"] > 0.5 and steps[-1]["reward_margin"] > 0
    assert any("reward margin=" in e.message for e in events)
    evals = [
        e.data for e in events if e.type == "metrics" and "eval_reward_margin" in (e.data or {})
    ]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] == 0

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints
    for checkpoint in checkpoints:
        metrics = checkpoint.metrics.model_dump()
        assert metrics["train_loss"] is not None
        assert {"train_reward_margin", "train_preference_accuracy"} <= set(metrics)

    adapter_id = stack.job(headers, job.id)["adapter_id"]
    with stack.http(headers) as c:
        adapter = c.get(f"/v1/adapters/{adapter_id}").json()
        archive = c.get(f"/v1/adapters/{adapter_id}/download")
    assert archive.status_code == 200
    assert adapter["metrics"]["method"] == "dpo"
    assert adapter["metrics"]["eval_preference_after"]["reward_margin"] > 0
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path, filter="data")

    import torch
    from peft import PeftModel

    from shared.train_spec import TrainSpec
    from worker.training.model import load_base_model

    spec = TrainSpec(**{**stack.job(headers, job.id)["qlora"], "base_model": str(base_model_dir)})
    base = load_base_model(spec, base_model_dir, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora and any(
        float(p.abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
