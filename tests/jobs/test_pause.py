"""A real run paused mid training (Postgres, Redis, S3 over HTTP, a worker process) resumes from
its checkpoint and ends exactly where an uninterrupted run with the same seed ends."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from tests.jobs.conftest import FAST_SPEC, ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_paused_mid_training_then_resumed_ends_where_an_uninterrupted_run_ends(
    stack: ServiceStack,
) -> None:
    headers = stack.new_tenant("pause-resume")
    file_id = stack.upload(headers, addition_rows(160, seed=31))
    spec = {**FAST_SPEC, "max_steps": 40, "checkpoint_steps": 100, "seed": 5}
    paused_job = stack.submit(headers, file_id, **spec)
    worker = stack.start_worker()
    try:
        stack.wait_for(headers, paused_job["id"], lambda j: j["progress"]["step"] >= 3)
        with stack.http(headers) as c:
            assert c.post(f"/v1/fine_tuning/jobs/{paused_job['id']}/pause").status_code == 200
        paused = stack.wait_for(headers, paused_job["id"], lambda j: j["status"] != "running")
        assert paused["status"] == "paused", paused
        step = paused["progress"]["step"]
        assert 3 <= step < 40
        with stack.http(headers) as c:
            ckpts = c.get(f"/v1/fine_tuning/jobs/{paused_job['id']}/checkpoints").json()["data"]
            assert [ck["step_number"] for ck in ckpts][:1] == [step]
            assert c.post(f"/v1/fine_tuning/jobs/{paused_job['id']}/resume").status_code == 200
        done = stack.wait_for(
            headers, paused_job["id"], lambda j: j["status"] in ("succeeded", "failed")
        )
        assert done["status"] == "succeeded", done["error"]
        reference_job = stack.submit(headers, file_id, **spec)
        reference = stack.wait_for(
            headers, reference_job["id"], lambda j: j["status"] in ("succeeded", "failed")
        )
    finally:
        stop(worker)
    events = [e["message"] for e in stack.events(headers, paused_job["id"])]
    assert any(m.startswith(f"Job paused at step {step}") for m in events), events
    assert any(m.startswith("Resuming from checkpoint") for m in events), events
    assert (
        reference["status"] == "succeeded" and reference["trained_tokens"] == done["trained_tokens"]
    )
    final, expected = done["progress"]["eval_loss"], reference["progress"]["eval_loss"]
    assert final is not None and final == pytest.approx(expected, rel=1e-5, abs=1e-6)

    # The results file: every step's training loss, before the pause (restored from the
    # checkpoint's history) and after, the same figures as the uninterrupted run's.
    def results_of(job: dict[str, Any]) -> list[dict[str, str]]:
        assert len(job["result_files"]) == 1
        with stack.http(headers) as c:
            meta = c.get(f"/v1/files/{job['result_files'][0]}").json()
            assert meta["purpose"] == "fine-tune-results"
            body = c.get(f"/v1/files/{job['result_files'][0]}/content")
        assert body.status_code == 200
        return list(csv.DictReader(io.StringIO(body.text)))

    rows, reference_rows = results_of(done), results_of(reference)
    # Steps count from 1 as in OpenAI's files (the evaluation before training is an event).
    assert [r["step"] for r in rows] == [str(n) for n in range(1, 41)]
    assert all(r["train_loss"] for r in rows) and rows[-1]["valid_loss"]
    for row, ref in zip(rows, reference_rows, strict=True):
        assert float(row["train_loss"]) == pytest.approx(float(ref["train_loss"]), rel=1e-5)
