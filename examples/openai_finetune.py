"""An OpenAI fine-tuning script of the kind teams wrote against api.openai.com, unchanged but
for where it points: `OPENAI_BASE_URL=http://<service>/v1` and `OPENAI_API_KEY=<tenant key>`.

It uploads a chat file, creates a supervised job, pauses and resumes it, follows its events,
reads the results file, picks a checkpoint, lists jobs by metadata, runs a DPO job on a
preference file, checks the exception classes a script catches, and deletes the fine-tuned
model. It prints a JSON summary (tests/jobs/test_openai_script.py runs it in CI).

    OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=sk-... \\
        python examples/openai_finetune.py --model tiny-llama --train chat.jsonl \\
        --preferences prefs.jsonl
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import openai
from openai import OpenAI

TERMINAL = {"succeeded", "failed", "cancelled"}


def wait(client: OpenAI, job_id: str, until: set[str], timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id}: still {job.status} after {timeout:.0f} s")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--preferences", type=Path, required=True)
    args = parser.parse_args()
    client = OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    summary: dict[str, Any] = {}

    with args.train.open("rb") as fh:
        train = client.files.create(file=fh, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=train.id,
        suffix="script",
        metadata={"team": "search"},
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}},
        },
    )
    client.fine_tuning.jobs.pause(job.id)
    summary["paused"] = wait(client, job.id, {"paused"} | TERMINAL).status
    client.fine_tuning.jobs.resume(job.id)
    job = wait(client, job.id, TERMINAL)
    summary["status"] = job.status
    summary["fine_tuned_model"] = job.fine_tuned_model
    summary["hyperparameters"] = job.method.supervised.hyperparameters.model_dump()
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=10))  # pages on
    summary["events"] = len(events)
    summary["last_event"] = events[0].message  # newest first

    results = client.files.content(job.result_files[0]).text
    rows = list(csv.DictReader(io.StringIO(results)))
    summary["results_columns"] = list(rows[0])
    summary["results_steps"] = len(rows)
    summary["first_train_loss"] = float(rows[0]["train_loss"])
    summary["last_train_loss"] = float(rows[-1]["train_loss"])

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    summary["checkpoint_steps"] = sorted(c.step_number for c in checkpoints)
    picked = max(checkpoints, key=lambda c: c.step_number)
    summary["checkpoint_model"] = client.models.retrieve(picked.fine_tuned_model_checkpoint).id

    listed = client.fine_tuning.jobs.list(metadata={"team": "search"})
    summary["listed_by_metadata"] = [j.id for j in listed.data] == [job.id]

    with args.preferences.open("rb") as fh:
        prefs = client.files.create(file=fh, purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(
        model=args.model,
        training_file=prefs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1}}},
    )
    dpo = wait(client, dpo.id, TERMINAL)
    summary["dpo_status"] = dpo.status
    summary["dpo_beta"] = dpo.method.dpo.hyperparameters.beta

    errors: dict[str, str] = {}
    try:
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    except openai.NotFoundError as exc:
        errors["not_found"] = exc.code or ""
    try:
        client.fine_tuning.jobs.create(
            model=args.model,
            training_file=train.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
        )
    except openai.BadRequestError as exc:
        errors["bad_request"] = exc.param or ""
    try:
        client.fine_tuning.jobs.cancel(job.id)
    except openai.ConflictError as exc:
        errors["conflict"] = exc.code or ""
    try:
        OpenAI(api_key="sk-not-a-key", max_retries=0).models.list()
    except openai.AuthenticationError as exc:
        errors["authentication"] = exc.code or ""
    summary["errors"] = errors

    summary["deleted"] = client.models.delete(job.fine_tuned_model).deleted
    try:
        client.models.retrieve(job.fine_tuned_model)
    except openai.NotFoundError:
        summary["gone"] = True
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
