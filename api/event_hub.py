"""Live job events for many SSE watchers at the cost of one.

Per API process and per watched job, one reader task wakes on Redis pub/sub (or polls the
table every 0.5 s without Redis), reads the job's new events from the database once, and puts
them on every watcher's queue. Without it, each watcher re-read the table on every event:
200 watchers of one job meant 200 queries per event.

Correctness does not depend on the hub: a watcher first registers its queue (the reader has
then already noted the job's newest `seq`), then reads its own backlog from the table, then
takes live events from its queue, skipping any `seq` it has sent. Events of one job commit in
`seq` order (writers lock the job row), so nothing falls between the backlog and the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from shared.events import channel
from shared.jobs import service
from shared.jobs.states import TERMINAL, JobStatus
from shared.models import Job, JobEvent

log = logging.getLogger("api.events")
POLL_S = 0.5
QUEUE_LIMIT = 2000  # a watcher this far behind is dropped; it reconnects with Last-Event-ID
DONE = None  # queue sentinel: the job is final and every event was handed out


class WatcherTooSlow(Exception):
    """The watcher fell too far behind and was dropped; its client reconnects."""


@dataclass
class _JobReader:
    job_id: str
    last_seq: int = 0
    queues: set[asyncio.Queue[Any]] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    init: asyncio.Task[int] | None = None
    finished: bool = False


class EventHub:
    def __init__(self, sessions: sessionmaker[Session], redis_url: str | None) -> None:
        self.sessions = sessions
        self.redis_url = redis_url
        self.readers: dict[str, _JobReader] = {}
        self._listener: asyncio.Task[None] | None = None
        self._redis_ok = False

    # ----------------------------------------------------------------- database reads

    def _newest_seq(self, job_id: str) -> int:
        with self.sessions() as session:
            value = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
            return int(value or 0)

    def _read(self, job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            status = job.status if job is not None else None  # status first, then rows
            return service.events_since(session, job_id=job_id, seq=after), status

    # ----------------------------------------------------------------- pub/sub listener

    async def _listen(self) -> None:
        """One Redis connection per process, pattern-subscribed to every job's channel."""
        import redis.asyncio as aioredis

        prefix = channel("")
        while True:
            try:
                client = aioredis.Redis.from_url(self.redis_url or "")
                pubsub = client.pubsub()
                await pubsub.psubscribe(prefix + "*")
                self._redis_ok = True
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    raw = message["channel"]
                    job_id = (raw.decode() if isinstance(raw, bytes) else raw)[len(prefix) :]
                    reader = self.readers.get(job_id)
                    if reader is not None:
                        reader.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: readers poll until it is back
                log.warning("event hub lost Redis (%s); polling", exc)
            self._redis_ok = False
            for reader in self.readers.values():
                reader.wake.set()
            await asyncio.sleep(1.0)

    def _ensure_listener(self) -> None:
        if self.redis_url and (self._listener is None or self._listener.done()):
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    # ----------------------------------------------------------------- per-job reader

    async def _run_reader(self, reader: _JobReader) -> None:
        while reader.queues:
            rows, status = await run_in_threadpool(self._read, reader.job_id, reader.last_seq)
            for row in rows:
                reader.last_seq = row.seq
                for queue in list(reader.queues):
                    self._put(reader, queue, row)
            if rows:
                continue
            if status is None or JobStatus(status) in TERMINAL:
                reader.finished = True
                for queue in list(reader.queues):
                    self._put(reader, queue, DONE)
                return
            reader.wake.clear()
            timeout = 15.0 if self._redis_ok else POLL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.wake.wait(), timeout)

    def _put(self, reader: _JobReader, queue: asyncio.Queue[Any], item: Any) -> None:
        if queue.qsize() >= QUEUE_LIMIT:
            reader.queues.discard(queue)
            item = WatcherTooSlow()
        queue.put_nowait(item)

    async def _register(self, job_id: str) -> tuple[_JobReader, asyncio.Queue[Any]]:
        self._ensure_listener()
        reader = self.readers.get(job_id)
        if reader is None or reader.finished:
            reader = _JobReader(job_id)
            self.readers[job_id] = reader
            reader.init = asyncio.get_running_loop().create_task(
                run_in_threadpool(self._newest_seq, job_id)
            )
        assert reader.init is not None
        newest = await reader.init  # every registrant waits for the reader's starting point
        if reader.task is None:
            reader.last_seq = max(reader.last_seq, newest)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        reader.queues.add(queue)
        if reader.task is None or reader.task.done():
            reader.task = asyncio.get_running_loop().create_task(self._run_reader(reader))
        return reader, queue

    def _unregister(self, reader: _JobReader, queue: asyncio.Queue[Any]) -> None:
        reader.queues.discard(queue)
        if not reader.queues:
            if reader.task is not None:
                reader.task.cancel()
            if self.readers.get(reader.job_id) is reader:
                del self.readers[reader.job_id]

    # ----------------------------------------------------------------- what a watcher sees

    async def watch(self, job_id: str, after: int) -> AsyncIterator[JobEvent | None]:
        """Events of `job_id` after `after`, in order; ends once the job is final and its
        events are sent. Yields None after 15 s of silence (the caller sends a keepalive)."""
        reader, queue = await self._register(job_id)
        try:
            rows, status = await run_in_threadpool(self._read, job_id, after)
            for row in rows:
                yield row
                after = row.seq
            if not rows and (status is None or JobStatus(status) in TERMINAL):
                return
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15.0)
                except TimeoutError:
                    yield None  # keepalive
                    continue
                if item is DONE:
                    return
                if isinstance(item, WatcherTooSlow):
                    raise item
                if item.seq > after:
                    yield item
                    after = item.seq
        finally:
            self._unregister(reader, queue)

    async def close(self) -> None:
        for reader in list(self.readers.values()):
            if reader.task is not None:
                reader.task.cancel()
        self.readers.clear()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
