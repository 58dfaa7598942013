"""A worker's presence (`worker.fleet`): registered, heartbeated with its current job, back after
a database outage, gone on a clean stop. On SQLite with a real thread."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.prestart import migrate
from shared.config import Settings
from shared.db import _engine_for, get_engine, session_factory
from shared.models import Worker
from tests.conftest import embedded_settings
from worker import fleet


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    settings = embedded_settings(tmp_path / "var", worker_heartbeat_seconds=0.05)
    migrate(settings)
    yield settings
    fleet.set_current_job(None)
    _engine_for(settings.database_url).dispose()


def row(sessions: sessionmaker[Session], worker_id: str) -> Worker | None:
    with sessions() as session:
        found = session.get(Worker, worker_id)
        if found is not None:
            session.expunge(found)
        return found


def eventually(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return found


def test_presence_registers_reports_its_job_survives_an_outage_and_leaves(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    sessions = session_factory(settings)
    presence = fleet.Presence(settings, "box:7", ["cpu", "gpu-24g"], "cpu", 24 * 2**30)
    presence.start()
    try:
        first = eventually("registration", lambda: row(sessions, "box:7"))
        assert first.queues == ["cpu", "gpu-24g"] and first.memory_bytes == 24 * 2**30
        fleet.set_current_job("ftjob-1")
        eventually("the current job", lambda: (w := row(sessions, "box:7")) and w.current_job_id)
        # A database outage: the table is gone for a while; the heartbeat logs and retries.
        with get_engine(settings).begin() as conn:
            conn.execute(text("ALTER TABLE workers RENAME TO workers_away"))
        eventually("a logged failure", lambda: "worker heartbeat failed" in caplog.text)
        with get_engine(settings).begin() as conn:
            conn.execute(text("DELETE FROM workers_away"))  # pruned while away
            conn.execute(text("ALTER TABLE workers_away RENAME TO workers"))
        back = eventually("re-registration", lambda: row(sessions, "box:7"))
        assert back.current_job_id == "ftjob-1" and back.queues == ["cpu", "gpu-24g"]
    finally:
        presence.stop()
    assert row(sessions, "box:7") is None
