"""SSE through real uvicorn API processes on Postgres + Redis: a job with thousands of events
streams whole and resumes mid-way, live events arrive, the job's reader survives its database
connections being killed mid-query, and each tenant's concurrent streams are capped."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared.db import session_factory
from shared.events import channel, record_event
from shared.models import Job
from tests import services
from tests.jobs.conftest import ServiceStack, addition_rows, stop
from tests.sse import (
    SseMessage,
    append_events,
    assert_complete,
    finish_job,
    parse_sse,
    stored_seqs,
)

STREAMS_APP = "qlora-api-streams"  # application_name of the second API's connections
STREAM_CAP = 6


class Watcher(threading.Thread):
    """One SSE client in a thread, from `Last-Event-ID` (or the start) to `done`."""

    def __init__(self, url: str, job_id: str, headers: dict[str, str], after: int | None = None):
        super().__init__(daemon=True)
        self.url = url
        self.path = f"/v1/fine_tuning/jobs/{job_id}/events"
        self.headers = {**headers, "Accept": "text/event-stream"}
        if after is not None:
            self.headers["Last-Event-ID"] = str(after)
        self.messages: list[SseMessage] = []
        self.status_code: int | None = None
        self.error: BaseException | None = None
        self.over = False
        self._changed = threading.Condition()
        self.start()

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=60) as client,
                client.stream("GET", self.path, headers=self.headers) as resp,
            ):
                self._note(lambda: setattr(self, "status_code", resp.status_code))
                for message in parse_sse(resp.iter_lines()):
                    self._note(lambda m=message: self.messages.append(m))
        except BaseException as exc:
            self.error = exc
        finally:
            self._note(lambda: setattr(self, "over", True))

    def _note(self, change: Callable[[], None]) -> None:
        with self._changed:
            change()
            self._changed.notify_all()

    def wait_for(self, count: int) -> None:
        """Until this watcher has received `count` messages (a guard against hanging)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.messages) >= count or self.over, 120)
        assert len(self.messages) >= count, (self.status_code, self.error, len(self.messages))

    def result(self) -> list[SseMessage]:
        self.join(180)
        assert not self.is_alive(), f"the stream never ended ({len(self.messages)} messages)"
        assert self.error is None and self.status_code == 200, (self.status_code, self.error)
        return self.messages


@pytest.fixture(scope="module")
def streams_api(stack: ServiceStack) -> Iterator[str]:
    """A second API process whose database connections carry `STREAMS_APP`, capped at
    `STREAM_CAP` streams per tenant."""
    port = services.free_port()
    proc = stack.spawn(
        "api-streams",
        ["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        DATABASE_URL=f"{stack.env['DATABASE_URL']}?application_name={STREAMS_APP}",
        MAX_STREAMS_PER_TENANT=str(STREAM_CAP),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the second API did not start:\n" + stack.tail_logs()
        time.sleep(0.3)
    yield url
    stop(proc, timeout=30)


@pytest.fixture(scope="module")
def sessions(stack: ServiceStack) -> sessionmaker[Session]:
    return session_factory(stack.settings)


def queued_job(stack: ServiceStack, tenant: dict[str, str]) -> str:
    """A job created through the API; no worker runs in this module, so it stays queued."""
    file_id = stack.upload(tenant, addition_rows(8, seed=7))
    job_id: str = stack.submit(tenant, file_id)["id"]
    return job_id


def test_a_long_stream_arrives_whole_and_resumes_mid_way(
    stack: ServiceStack, sessions: sessionmaker[Session]
) -> None:
    tenant = stack.new_tenant("long-stream")
    job_id = queued_job(stack, tenant)
    append_events(sessions, job_id, 2100, batches=3)
    finish_job(sessions, job_id, "cancelled")
    stored = stored_seqs(sessions, job_id)
    assert len(stored) > 2000
    whole = Watcher(stack.url, job_id, tenant).result()
    assert_complete(whole, stored, "cancelled")
    middle = len(stored) // 2
    rest = Watcher(stack.url, job_id, tenant, after=stored[middle]).result()
    assert_complete(rest, stored[middle + 1 :], "cancelled")


def test_live_events_reach_a_connected_watcher(
    stack: ServiceStack, sessions: sessionmaker[Session]
) -> None:
    tenant = stack.new_tenant("live-stream")
    job_id = queued_job(stack, tenant)
    append_events(sessions, job_id, 10)
    watcher = Watcher(stack.url, job_id, tenant)
    watcher.wait_for(len(stored_seqs(sessions, job_id)))
    append_events(sessions, job_id, 1100)  # one commit: the reader reads it in pages
    append_events(sessions, job_id, 5, batches=5)
    finish_job(sessions, job_id, "cancelled")
    assert_complete(watcher.result(), stored_seqs(sessions, job_id), "cancelled")


def _blocked_reads(session: Session) -> int:
    """The second API's queries now waiting for the test's lock on `job_events`."""
    session.execute(text("SELECT pg_stat_clear_snapshot()"))  # else one per transaction
    return int(
        session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND application_name = :app "
                "AND wait_event_type = 'Lock'"
            ),
            {"app": STREAMS_APP},
        )
        or 0
    )


def _activity(session: Session) -> str:
    session.execute(text("SELECT pg_stat_clear_snapshot()"))
    rows = session.execute(
        text(
            "SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = :app"
        ),
        {"app": STREAMS_APP},
    ).all()
    return "the readers never queried the database: " + "\n".join(map(str, rows))


def _kill_blocked_reads(session: Session) -> int:
    rows = session.execute(
        text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = :app AND wait_event_type = 'Lock'"
        ),
        {"app": STREAMS_APP},
    ).all()
    return sum(1 for (killed,) in rows if killed)


def fault_round(
    stack: ServiceStack,
    sessions: sessionmaker[Session],
    job_ids: list[str],
    connect: Callable[[], list[Watcher]],
    blocked: int,
) -> tuple[list[Watcher], int]:
    """Lock `job_events`, wake the readers, let `connect` start new watchers, wait until
    `blocked` of the second API's reads wait on the lock, kill their connections, append an
    event to each job and commit. Returns the new watchers and how many reads were killed."""
    with sessions.begin() as session:
        session.execute(text("LOCK TABLE job_events IN ACCESS EXCLUSIVE MODE"))
        with stack.broker() as nudge:
            for job_id in job_ids:
                nudge.publish(channel(job_id), "{}")
        started = connect()
        deadline = time.monotonic() + 120
        while _blocked_reads(session) < blocked:
            assert time.monotonic() < deadline, _activity(session)
            time.sleep(0.05)
        killed = _kill_blocked_reads(session)
        for job_id in job_ids:
            record_event(session, session.get_one(Job, job_id), "written during a fault")
    return started, killed


def test_watchers_keep_receiving_while_their_reader_connections_are_killed(
    stack: ServiceStack, streams_api: str, sessions: sessionmaker[Session]
) -> None:
    tenant = stack.new_tenant("reader-faults")
    first, second = queued_job(stack, tenant), queued_job(stack, tenant)
    append_events(sessions, first, 50)
    watchers = [Watcher(streams_api, first, tenant) for _ in range(2)]
    for watcher in watchers:
        watcher.wait_for(len(stored_seqs(sessions, first)))
    killed = 0

    def join_both() -> list[Watcher]:  # one joins a reader, one starts the second job's
        return [Watcher(streams_api, first, tenant), Watcher(streams_api, second, tenant)]

    # 3 blocked: the first job's reader, the newcomer's backlog, the second job's first read
    new, n = fault_round(stack, sessions, [first], join_both, blocked=3)
    watchers, killed = watchers + new, killed + n
    for _ in range(3):
        new, n = fault_round(stack, sessions, [first, second], list, blocked=2)
        killed += n
        append_events(sessions, first, 20, batches=2)
        append_events(sessions, second, 20, batches=2)
    new, n = fault_round(
        stack, sessions, [first, second], lambda: [Watcher(streams_api, first, tenant)], 3
    )
    watchers, killed = watchers + new, killed + n
    append_events(sessions, first, 10)
    finish_job(sessions, first, "cancelled")
    finish_job(sessions, second, "failed")
    assert killed >= 12, "fewer reads were killed than the rounds set up"
    for watcher in watchers:
        job_id = watcher.path.split("/")[-2]
        status = "cancelled" if job_id == first else "failed"
        assert_complete(watcher.result(), stored_seqs(sessions, job_id), status)


def _hold_stream(url: str, job_id: str, tenant: dict[str, str]) -> socket.socket:
    """An SSE request on a bare socket, read up to its status line so that it holds a slot;
    asked again while the answer is 429 (a slot given back a moment ago)."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"GET /v1/fine_tuning/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {tenant['Authorization']}\r\nAccept: text/event-stream\r\n\r\n"
    )
    deadline = time.monotonic() + 60
    while True:
        conn = socket.create_connection((host, int(port)), timeout=60)
        conn.sendall(request.encode())
        status = conn.recv(12)
        if status == b"HTTP/1.1 200":
            return conn
        conn.close()
        assert status == b"HTTP/1.1 429", status
        assert time.monotonic() < deadline, "a stream that ended never gave its slot back"
        time.sleep(0.1)


def _one_more_stream(url: str, job_id: str, tenant: dict[str, str]) -> httpx.Response:
    """The answer to one more stream request; closed at once if it was let in."""
    with httpx.Client(base_url=url, timeout=60) as client:
        sse = {**tenant, "Accept": "text/event-stream"}
        with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", headers=sse) as resp:
            if resp.status_code != 200:
                resp.read()
            return resp


def test_each_tenant_has_a_capped_number_of_streams(
    stack: ServiceStack, streams_api: str, sessions: sessionmaker[Session]
) -> None:
    tenant, other = stack.new_tenant("many-streams"), stack.new_tenant("one-stream")
    job_id, later_job = queued_job(stack, tenant), queued_job(stack, tenant)
    watchers = [Watcher(streams_api, job_id, tenant) for _ in range(STREAM_CAP - 1)]
    for watcher in watchers:
        watcher.wait_for(1)
    raw = _hold_stream(streams_api, job_id, tenant)

    refused = _one_more_stream(streams_api, job_id, tenant)
    assert refused.status_code == 429 and refused.headers["Retry-After"].isdigit()
    error = refused.json()["error"]
    assert error["code"] == "too_many_streams" and error["param"] == "Accept"
    other_job = queued_job(stack, other)  # another tenant's streams are counted apart
    assert _one_more_stream(streams_api, other_job, other).status_code == 200

    raw.close()  # a client that goes away gives its slot back
    _hold_stream(streams_api, job_id, tenant).close()
    finish_job(sessions, job_id, "cancelled")  # streams that end give theirs back
    for watcher in watchers:
        assert watcher.result()[-1].type == "done"
    held = [_hold_stream(streams_api, later_job, tenant) for _ in range(STREAM_CAP)]
    assert _one_more_stream(streams_api, later_job, tenant).status_code == 429
    for conn in held:
        conn.close()
