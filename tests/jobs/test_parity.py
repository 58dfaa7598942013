"""OpenAI parity on the real path (Postgres, Redis, S3 over HTTP, a worker process), through the
official SDK with strict validation: a job's checkpoints by name, jobs continuing from the
fine-tuned model and from a checkpoint, `estimated_finish`, and the run's metrics in Weights &
Biases (offline mode) and MLflow (a local file store), read back from what each recorded.
Pause and resume through the SDK: tests/api/test_openai_sdk.py (the real-path pause:
tests/jobs/test_pause.py)."""

from __future__ import annotations

import csv
import io
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob

from tests.harness.stack import jsonl
from tests.jobs.conftest import FAST_SPEC, ServiceStack, StartStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def tracked(
    start_stack: StartStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServiceStack, Path]]:
    """A stack whose API and worker are configured for both integrations."""
    root = tmp_path_factory.mktemp("tracking")
    (root / "wandb").mkdir()
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        # MLflow 3 keeps its file store behind this switch; a SQLite store works the same but
        # costs ~15 s of schema migrations on a loaded CI machine.
        "MLFLOW_TRACKING_URI": f"file://{root / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }
    with start_stack(**env) as stack:
        yield stack, root


def wait(client: OpenAI, job_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll the job (raw JSON: a paused job's status is unknown to the SDK's type)."""
    deadline = time.monotonic() + 240
    while True:
        job: dict[str, Any] = client.fine_tuning.jobs.with_raw_response.retrieve(
            job_id
        ).http_response.json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"timed out: {job}"
        time.sleep(0.2)


def first_loss(client: OpenAI, job: FineTuningJob) -> float:
    body = client.files.content(job.result_files[0]).text
    rows = list(csv.DictReader(io.StringIO(body)))
    return float(next(r["train_loss"] for r in rows if r["step"] == "1"))


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """The history rows of an offline W&B run, read from its `.wandb` file (W&B's record log:
    a 7-byte header, then 32 KiB blocks of records with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    history: dict[int, dict[str, float]] = {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # first and middle parts of a long record
            buf = (buf if kind == 3 else b"") + chunk
            continue
        record = pb.Record()  # type: ignore[attr-defined]
        record.ParseFromString(buf + chunk if kind == 4 else chunk)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            row = history.setdefault(int(items["_step"]), {})
            row.update({k: float(v) for k, v in items.items() if not k.startswith("_")})
    return history


def test_checkpoint_names_continuing_and_tracking_through_the_sdk(
    tracked: tuple[ServiceStack, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, root = tracked
    headers = stack.new_tenant("Parity Org")
    sdk = OpenAI(
        base_url=f"{stack.url}/v1",
        api_key=headers["Authorization"].removeprefix("Bearer "),
        max_retries=0,
        _strict_response_validation=True,
    )
    other = OpenAI(
        base_url=f"{stack.url}/v1",
        api_key=stack.new_tenant("other")["Authorization"].removeprefix("Bearer "),
        max_retries=0,
        _strict_response_validation=True,
    )
    rows = jsonl(addition_rows(64, seed=11))
    file_id = sdk.files.create(file=("train.jsonl", rows), purpose="fine-tune").id
    spec = {**FAST_SPEC, "seed": 3, "max_steps": 8}  # a checkpoint at step 4
    first = sdk.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=file_id,
        suffix="first",
        integrations=[
            {"type": "wandb", "wandb": {"project": "parity", "tags": ["ci"]}},
            {"type": "mlflow", "mlflow": {"experiment": "parity"}},  # type: ignore[typeddict-item,typeddict-unknown-key]
        ],
        extra_body={"qlora": spec},
    )
    assert first.integrations is not None and first.integrations[0].wandb.project == "parity"
    assert first.hyperparameters.learning_rate_multiplier == 10.0  # qlora's 2e-3 over 2e-4
    worker = stack.start_worker()
    try:
        seen: list[tuple[str, int | None]] = []

        def finished(job: dict[str, Any]) -> bool:
            seen.append((job["status"], job["estimated_finish"]))
            return job["status"] in ("succeeded", "failed", "cancelled")

        wait(sdk, first.id, finished)
        done = sdk.fine_tuning.jobs.retrieve(first.id)
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model is not None and done.estimated_finish is None
        running = [est for status, est in seen if status == "running" and est is not None]
        assert running and all(done.created_at <= est < time.time() + 600 for est in running)
        assert all(est is None for status, est in seen if status != "running")

        checkpoints = sdk.fine_tuning.jobs.checkpoints.list(first.id).data
        assert [c.step_number for c in checkpoints] == [4]
        for c in checkpoints:
            assert c.fine_tuned_model_checkpoint == (
                f"ft:tiny-llama:parity-org:first:{first.id}:ckpt-step-{c.step_number}"
            )
        checkpoint = checkpoints[0].fine_tuned_model_checkpoint
        assert sdk.models.retrieve(checkpoint).id == checkpoint
        assert sdk.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model

        # Continue from the fine-tuned model (two steps suffice), then from the checkpoint.
        short = {**spec, "max_steps": 2, "checkpoint_steps": None}
        second = sdk.fine_tuning.jobs.create(
            model=done.fine_tuned_model,
            training_file=file_id,
            suffix="second",
            extra_body={"qlora": short},
        )
        assert second.model == done.fine_tuned_model
        third = sdk.fine_tuning.jobs.create(
            model=checkpoint, training_file=file_id, extra_body={"qlora": short}
        )
        wait(sdk, second.id, lambda j: j["status"] in ("succeeded", "failed"))
        continued = sdk.fine_tuning.jobs.retrieve(second.id)
        assert continued.status == "succeeded", continued.error
        assert continued.model == done.fine_tuned_model
        assert continued.fine_tuned_model is not None
        assert continued.fine_tuned_model.startswith("ft:tiny-llama:parity-org:second:")
        # Same data, same seed, so the same first batch: the continued job starts lower.
        assert first_loss(sdk, continued) < first_loss(sdk, done) - 0.1

        wait(sdk, third.id, lambda j: j["status"] in ("succeeded", "failed"))
        from_checkpoint = sdk.fine_tuning.jobs.retrieve(third.id)
        assert from_checkpoint.status == "succeeded", from_checkpoint.error
        assert from_checkpoint.model == checkpoint
        assert first_loss(sdk, from_checkpoint) < first_loss(sdk, done) - 0.1
    finally:
        stop(worker)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.create(model=checkpoint, training_file=file_id)

    # What W&B (offline) and MLflow recorded for the first job.
    runs = list((root / "wandb" / "wandb").glob(f"offline-run-*/run-{first.id}.wandb"))
    assert len(runs) == 1, list((root / "wandb").rglob("*.wandb"))
    history = wandb_history(runs[0])
    assert [s for s in sorted(history) if "train_loss" in history[s]] == list(range(1, 9))
    assert {"valid_loss", "valid_mean_token_accuracy"} <= set(history[0])
    assert {"train_loss", "learning_rate", "train_mean_token_accuracy"} <= set(history[8])
    assert "valid_loss" in history[8]

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow = MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name("parity")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == first.id and run.info.status == "FINISHED"
    assert run.data.tags["qlora.job_id"] == first.id and run.data.params["rank"] == "16"
    train_loss = mlflow.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in train_loss] == list(range(1, 9))
    assert [m.value for m in train_loss] == pytest.approx(
        [history[s]["train_loss"] for s in range(1, 9)]
    )
    valid = mlflow.get_metric_history(run.info.run_id, "valid_loss")
    assert [m.step for m in valid] == [0, 8]
