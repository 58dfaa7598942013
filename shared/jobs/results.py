"""A finished job's results file: OpenAI's `result_files[0]`, a CSV of the run's metrics.

Columns as OpenAI's results files have them: step, train_loss, train_mean_token_accuracy,
valid_loss, valid_mean_token_accuracy, plus this service's learning_rate and tokens_per_second.
Rows start at step 1 (the evaluation before training stays in the events). An empty cell is
a figure the run did not measure at that step (validation runs every
`eval_steps`; throughput comes from the throttled progress events). Token accuracy is the share
of trained tokens whose argmax logit is the label, from the loss's own logits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import File, JobEvent

PURPOSE = "fine-tune-results"
COLUMNS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "learning_rate",
    "tokens_per_second",
)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return "" if not math.isfinite(value) else repr(float(value))


def metric_events(session: Session, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's metrics events, oldest first."""
    rows = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq)
    )
    return [data for data in rows if data]


def build_rows(history: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per step: training loss, token accuracy and learning rate from the engine's
    per-step history, validation figures and throughput from the (throttled) metrics events.
    Where a resumed attempt repeated a step, its later figure wins."""
    by_step: dict[int, dict[str, str]] = {}

    def row(step: Any) -> dict[str, str] | None:
        # steps count from 1 as in OpenAI's files: the evaluation before training (step 0)
        # stays in the events, so `rows[0]` is the first training step with its loss
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            return None
        found = by_step.setdefault(step, dict.fromkeys(COLUMNS, ""))
        found["step"] = str(step)
        return found

    for entry in history:
        if (found := row(entry.get("step"))) is not None:
            found["train_loss"] = _cell(entry.get("loss"))
            found["train_mean_token_accuracy"] = _cell(entry.get("accuracy"))
            found["learning_rate"] = _cell(entry.get("lr"))
    for data in events:
        if (found := row(data.get("step"))) is None:
            continue
        if "eval_loss" in data:
            found["valid_loss"] = _cell(data["eval_loss"])
            found["valid_mean_token_accuracy"] = _cell(data.get("mean_token_accuracy"))
            continue
        for column, key in (
            ("train_loss", "loss"),
            ("train_mean_token_accuracy", "mean_token_accuracy"),
            ("learning_rate", "lr"),
            ("tokens_per_second", "tokens_per_second"),
        ):
            if key in data and not found[column]:
                found[column] = _cell(data[key])
    return [by_step[step] for step in sorted(by_step)]


def render_csv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def results_file(
    *, tenant_id: str, job_id: str, file_id: str, key: str, body: bytes, rows: int
) -> File:
    """The File row of an uploaded results CSV (inserted with the job's final transition)."""
    return File(
        id=file_id,
        tenant_id=tenant_id,
        filename=f"{job_id}-results.csv",
        purpose=PURPOSE,
        bytes=len(body),
        format="csv",
        rows=rows,
        sha256=hashlib.sha256(body).hexdigest(),
        stats={"job_id": job_id},
        storage_key=key,
    )
