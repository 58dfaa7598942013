"""Reading a job's SSE stream in tests: its messages, and what a complete stream must hold."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.events import record_event
from shared.jobs.states import JobStatus, set_status
from shared.models import Job, JobEvent


@dataclass(frozen=True)
class SseMessage:
    seq: int | None  # None for `done`
    type: str
    data: dict[str, Any]


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Messages in arrival order, up to and including `done`; comments are skipped."""
    seq: int | None = None
    kind, data = "message", None
    for line in lines:
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and data is not None:
            yield SseMessage(seq, kind, data)
            if kind == "done":
                return
            seq, kind, data = None, "message", None


def stored_seqs(sessions: sessionmaker[Session], job_id: str) -> list[int]:
    with sessions() as session:
        query = select(JobEvent.seq).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        return list(session.scalars(query))


def append_events(
    sessions: sessionmaker[Session], job_id: str, count: int, *, batches: int = 1
) -> None:
    """`count` message events through `record_event`, committed in `batches` transactions."""
    per_batch = -(-count // batches)
    written = 0
    while written < count:
        with sessions.begin() as session:
            job = session.get_one(Job, job_id)
            for _ in range(min(per_batch, count - written)):
                written += 1
                record_event(session, job, f"note {written}", data={"n": written})


def assert_complete(messages: list[SseMessage], stored: list[int], status: str) -> None:
    """Every stored event once and in order, the terminal status event last, then `done`."""
    events = [m for m in messages if m.type != "done"]
    assert [m.seq for m in events] == stored, "a stored event was lost, repeated or reordered"
    assert (events[-1].data["data"] or {}).get("status") == status, "no terminal status event"
    assert messages[-1].type == "done" and messages[-1].data == {"status": status}


def finish_job(sessions: sessionmaker[Session], job_id: str, status: str = "cancelled") -> None:
    with sessions.begin() as session:
        job = session.get_one(Job, job_id)
        assert set_status(session, job, JobStatus(status), message=f"the test made it {status}")
