"""The event hub: paging, retries of failed database reads, stream slots (on SQLite through a
session factory that fails on demand); and a long SSE stream on both in-process stacks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.event_hub import Backoff, EventHub, StreamEnd, StreamInterrupted, StreamSlots
from api.prestart import migrate
from shared.db import _engine_for, session_factory
from shared.errors import Invalid, RateLimited
from shared.ids import new_id
from shared.jobs.service import parse_event_id
from shared.models import Job
from shared.tenancy import service as tenancy
from tests.conftest import Stack, embedded_settings
from tests.sse import append_events, assert_complete, finish_job, parse_sse, stored_seqs

FAST = Backoff(first_s=0.01, max_s=0.05)
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
}


class FlakySessions:
    """A session factory whose next `failures` calls raise: `OperationalError` (a dropped
    database connection) unless `error` says otherwise."""

    def __init__(self, real: sessionmaker[Session]) -> None:
        self.real = real
        self.failures = 0
        self.failed = 0
        self.error: Callable[[], Exception] = lambda: OperationalError(
            "SELECT", {}, Exception("terminating connection due to administrator command")
        )

    def __call__(self) -> Session:
        if self.failures > 0:
            self.failures -= 1
            self.failed += 1
            raise self.error()
        return self.real()


@pytest.fixture
def job_log(tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], str]]:
    """A SQLite database with one queued job; yields its session factory and the job id."""
    settings = embedded_settings(tmp_path / "var")
    migrate(settings)
    sessions = session_factory(settings)
    with sessions.begin() as session:
        tenant = tenancy.create_tenant(session, name="watchers")
        job = Job(
            id=new_id("job"),
            tenant_id=tenant.id,
            model="tiny-sse",
            training_file="file-none",
            status="queued",
            spec={},
            hyperparameters={},
            seed=0,
            gpu_class="cpu",
        )
        session.add(job)
    yield sessions, job.id
    _engine_for(settings.database_url).dispose()


async def follow(hub: EventHub, job_id: str, into: list[Any], after: int = 0) -> None:
    async for item in hub.watch(job_id, after):
        if item is not None:
            into.append(item)


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 60)  # a guard against hanging, not a performance bound


def assert_whole(items: list[Any], stored: list[int]) -> None:
    assert [item.seq for item in items[:-1]] == stored, "lost, repeated or reordered"
    assert items[-1] == StreamEnd("cancelled")


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = Backoff(first_s=0.2, max_s=5.0).delays()
    assert [next(delays) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_a_finished_job_streams_every_page_then_ends(
    job_log: tuple[sessionmaker[Session], str],
) -> None:
    sessions, job_id = job_log
    append_events(sessions, job_id, 1200, batches=2)
    finish_job(sessions, job_id)

    async def watch() -> list[Any]:
        hub = EventHub(sessions, None, backoff=FAST)
        items: list[Any] = []
        await follow(hub, job_id, items)
        await hub.close()
        return items

    assert_whole(asyncio.run(watch()), stored_seqs(sessions, job_id))


def test_watchers_keep_their_place_while_the_reader_retries(
    job_log: tuple[sessionmaker[Session], str],
) -> None:
    sessions, job_id = job_log
    flaky = FlakySessions(sessions)
    append_events(sessions, job_id, 30)

    async def scenario() -> tuple[list[Any], list[Any]]:
        hub = EventHub(flaky, None, backoff=FAST)  # type: ignore[arg-type]
        early: list[Any] = []
        late: list[Any] = []
        watching = [asyncio.create_task(follow(hub, job_id, early))]
        await until(lambda: len(early) == 30)
        flaky.failures = 10**9  # the database is gone
        append_events(sessions, job_id, 20, batches=4)
        await until(lambda: flaky.failed >= 3)  # the reader is retrying
        watching.append(asyncio.create_task(follow(hub, job_id, late)))  # joins meanwhile
        await until(lambda: flaky.failed >= 6)
        flaky.failures = 0  # it is back
        append_events(sessions, job_id, 1200)  # more than two of the reader's pages at once
        finish_job(sessions, job_id)
        await asyncio.wait_for(asyncio.gather(*watching), 60)
        await hub.close()
        return early, late

    early, late = asyncio.run(scenario())
    stored = stored_seqs(sessions, job_id)
    assert_whole(early, stored)
    assert_whole(late, stored)


def test_a_failing_first_read_does_not_poison_the_reader(
    job_log: tuple[sessionmaker[Session], str],
) -> None:
    sessions, job_id = job_log
    flaky = FlakySessions(sessions)
    append_events(sessions, job_id, 40)

    async def scenario() -> tuple[list[Any], list[Any]]:
        hub = EventHub(flaky, None, backoff=FAST)  # type: ignore[arg-type]
        first: list[Any] = []
        second: list[Any] = []
        flaky.failures = 10**9
        watching = [asyncio.create_task(follow(hub, job_id, first))]
        await until(lambda: flaky.failed >= 3)  # the reader cannot learn where the log ends
        watching.append(asyncio.create_task(follow(hub, job_id, second)))
        await until(lambda: flaky.failed >= 6)
        flaky.failures = 0
        append_events(sessions, job_id, 5)
        finish_job(sessions, job_id)
        await asyncio.wait_for(asyncio.gather(*watching), 60)
        await hub.close()
        return first, second

    first, second = asyncio.run(scenario())
    stored = stored_seqs(sessions, job_id)
    assert_whole(first, stored)
    assert_whole(second, stored)


def test_a_reader_stopped_by_a_bug_drops_its_watchers_and_the_next_starts_afresh(
    job_log: tuple[sessionmaker[Session], str],
) -> None:
    sessions, job_id = job_log
    flaky = FlakySessions(sessions)
    append_events(sessions, job_id, 10)
    finish_job(sessions, job_id)

    async def scenario() -> list[Any]:
        hub = EventHub(flaky, None, backoff=FAST)  # type: ignore[arg-type]
        flaky.failures, flaky.error = 1, lambda: RuntimeError("not the database")
        with pytest.raises(StreamInterrupted):
            await asyncio.wait_for(follow(hub, job_id, []), 60)
        again: list[Any] = []
        await asyncio.wait_for(follow(hub, job_id, again), 60)
        await hub.close()
        return again

    assert_whole(asyncio.run(scenario()), stored_seqs(sessions, job_id))


def test_stream_slots_cap_each_tenant_and_each_comes_back_once() -> None:
    slots = StreamSlots()
    releases = [slots.take("org-a", limit=2) for _ in range(2)]
    slots.take("org-b", limit=2)  # another tenant's streams do not count
    with pytest.raises(RateLimited) as refused:
        slots.take("org-a", limit=2)
    assert refused.value.code == "too_many_streams" and refused.value.param == "Accept"
    assert refused.value.headers["Retry-After"].isdigit()
    releases[0]()
    releases[0]()  # a second release of the same slot gives nothing back
    assert slots.open("org-a") == 1
    slots.take("org-a", limit=2)
    with pytest.raises(RateLimited):
        slots.take("org-a", limit=2)


# ------------------------------------------------------------------ through the API


def queued_job(stack: Stack) -> tuple[dict[str, str], str]:
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny-sse", "source": "org/tiny-sse", "config": TINY_CONFIG},
    )
    _, headers, _ = stack.new_tenant("watchers")
    body = (json.dumps({"prompt": "a", "completion": "b"}) + "\n").encode() * 4
    file_id = stack.client.post(
        "/v1/files",
        headers=headers,
        data={"purpose": "fine-tune"},
        files={"file": ("train.jsonl", body)},
    ).json()["id"]
    resp = stack.client.post(
        "/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "tiny-sse", "training_file": file_id},
    )
    assert resp.status_code == 200, resp.text
    return headers, resp.json()["id"]


def test_a_long_finished_stream_arrives_whole_and_resumes_mid_way(stack: Stack) -> None:
    headers, job_id = queued_job(stack)
    sessions = session_factory(stack.settings)
    append_events(sessions, job_id, 2100, batches=3)
    finish_job(sessions, job_id)
    stored = stored_seqs(sessions, job_id)
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    sse = {**headers, "Accept": "text/event-stream"}
    with stack.client.stream("GET", url, headers=sse) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert_complete(list(parse_sse(resp.iter_lines())), stored, "cancelled")
    middle = len(stored) // 2
    resume = {**sse, "Last-Event-ID": str(stored[middle])}
    with stack.client.stream("GET", url, headers=resume) as resp:
        assert_complete(list(parse_sse(resp.iter_lines())), stored[middle + 1 :], "cancelled")


@pytest.mark.parametrize("value", ["abc", "-1", "\u00b2", "9" * 5000, "9" * 19])
def test_an_event_id_is_ascii_digits_within_bigint(value: str) -> None:
    with pytest.raises(Invalid) as refused:
        parse_event_id(value, param="Last-Event-ID")
    assert refused.value.param == "Last-Event-ID"
    assert parse_event_id("ftevent-" + "9" * 18) == 10**18 - 1  # 18 digits: any BIGINT seq


@pytest.mark.parametrize("last_event_id", ["abc", "9" * 5000])
def test_a_bad_last_event_id_is_refused_naming_the_header(stack: Stack, last_event_id: str) -> None:
    headers, job_id = queued_job(stack)
    resp = stack.client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events",
        headers={**headers, "Accept": "text/event-stream", "Last-Event-ID": last_event_id},
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_value" and error["param"] == "Last-Event-ID"
