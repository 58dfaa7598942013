"""Live job events for many SSE watchers at the cost of one.

Per API process and per watched job, one reader task wakes on Redis pub/sub (or polls the
table every 0.5 s without Redis), reads the job's new events from the database in pages, and
puts them on every watcher's queue. Without it, each watcher re-read the table on every event:
200 watchers of one job meant 200 queries per event.

Correctness does not depend on the hub: a watcher registers its queue, waits until the reader
knows where the log ended when it started (`positioned`), notes the reader's position, pages
its own backlog from the table up to that position, then takes live events from its queue,
skipping any `seq` it has sent. Events of one job commit in `seq` order (writers lock the job
row), so nothing falls between the backlog and the queue.

Every read retries database errors with bounded exponential backoff; the reader keeps its
position and its watchers while it retries, so an outage delays events but never ends a
stream or loses one. Only an error that is not the database's ends the reader: its watchers
are then dropped without `done` (their clients reconnect with Last-Event-ID) and the next
watcher starts a fresh reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from shared.errors import RateLimited
from shared.events import channel
from shared.jobs import event_log
from shared.jobs.states import TERMINAL, JobStatus
from shared.models import JobEvent

log = logging.getLogger("api.events")
T = TypeVar("T")
POLL_S = 0.5
KEEPALIVE_S = 15.0
QUEUE_LIMIT = 2000  # a watcher this far behind is dropped; it reconnects with Last-Event-ID
STREAM_RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Backoff:
    """Delays between retries of a failed read: `first_s`, doubling, never above `max_s`."""

    first_s: float = 0.2
    max_s: float = 5.0

    def delays(self) -> Iterator[float]:
        delay = self.first_s
        while True:
            yield delay
            delay = min(delay * 2, self.max_s)


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a watch: the job is final and every event was handed out."""

    status: str | None


class StreamInterrupted(Exception):
    """The watcher was dropped before the end; its client reconnects with Last-Event-ID."""


class WatcherTooSlow(StreamInterrupted):
    """The watcher fell more than `QUEUE_LIMIT` events behind."""


class ReaderFailed(StreamInterrupted):
    """The job's reader stopped on an error that was not the database's."""


class StreamSlots:
    """Concurrent streams per tenant in this process; taken in a worker thread, given back
    on the event loop, hence the lock."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, tenant_id: str, *, limit: int) -> Callable[[], None]:
        """One slot for `tenant_id`, or 429 `too_many_streams`; returns its (idempotent) release."""
        with self._lock:
            if self._open[tenant_id] >= limit:
                raise RateLimited(
                    f"this organization already has {limit} event streams open in this "
                    "server; close one or retry later",
                    param="Accept",
                    code="too_many_streams",
                    headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
                )
            self._open[tenant_id] += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._open[tenant_id] -= 1
                    if self._open[tenant_id] <= 0:
                        del self._open[tenant_id]

        return release

    def open(self, tenant_id: str) -> int:
        with self._lock:
            return self._open[tenant_id]


@dataclass
class _JobReader:
    job_id: str
    last_seq: int = 0  # every event up to here was handed out (or predates the reader)
    positioned: asyncio.Event = field(default_factory=asyncio.Event)
    queues: set[asyncio.Queue[Any]] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class EventHub:
    def __init__(
        self, sessions: sessionmaker[Session], redis_url: str | None, backoff: Backoff = Backoff()
    ) -> None:
        self.sessions = sessions
        self.redis_url = redis_url
        self.backoff = backoff
        self.readers: dict[str, _JobReader] = {}
        self.streams = StreamSlots()
        self._listener: asyncio.Task[None] | None = None
        self._redis_ok = False

    # ----------------------------------------------------------------- database reads

    def _newest_seq(self, job_id: str) -> int:
        with self.sessions() as session:
            return event_log.newest_seq(session, job_id=job_id)

    def _read_new(self, job_id: str, after: int) -> tuple[str | None, list[JobEvent]]:
        with self.sessions() as session:
            status = event_log.job_status(session, job_id=job_id)  # status first, then rows
            return status, event_log.events_after(session, job_id=job_id, after=after)

    def _read_backlog(self, job_id: str, after: int, upto: int) -> list[JobEvent]:
        with self.sessions() as session:
            return event_log.events_after(session, job_id=job_id, after=after, upto=upto)

    async def _with_retries(self, read: Callable[..., T], *args: Any) -> T:
        """`read(*args)` in a worker thread until it gets through the database."""
        delays = self.backoff.delays()
        while True:
            try:
                return await run_in_threadpool(read, *args)
            except SQLAlchemyError as exc:
                delay = next(delays)
                log.warning("event read failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

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
        try:
            reader.last_seq = await self._with_retries(self._newest_seq, reader.job_id)
            reader.positioned.set()
            while reader.queues:
                status, rows = await self._with_retries(
                    self._read_new, reader.job_id, reader.last_seq
                )
                self._hand_out(reader, rows)
                if rows:
                    continue  # a full page: read on until caught up
                if status is None or JobStatus(status) in TERMINAL:
                    self._finish(reader, StreamEnd(status))
                    return
                reader.wake.clear()
                timeout = KEEPALIVE_S if self._redis_ok else POLL_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.wake.wait(), timeout)
            self._finish(reader, ReaderFailed())  # no watcher left: nothing is handed out
        except Exception:
            log.exception("event reader of job %s stopped", reader.job_id)
            self._finish(reader, ReaderFailed())

    def _hand_out(self, reader: _JobReader, rows: list[JobEvent]) -> None:
        for row in rows:
            reader.last_seq = row.seq
            for queue in list(reader.queues):
                self._put(reader, queue, row)

    def _finish(self, reader: _JobReader, last: StreamEnd | ReaderFailed) -> None:
        """The reader's last act: later watchers of the job get a new reader."""
        if self.readers.get(reader.job_id) is reader:
            del self.readers[reader.job_id]
        for queue in list(reader.queues):
            self._put(reader, queue, last)
        reader.positioned.set()  # a watcher still waiting for a start finds `last` queued

    def _put(self, reader: _JobReader, queue: asyncio.Queue[Any], item: Any) -> None:
        if queue.qsize() >= QUEUE_LIMIT:
            reader.queues.discard(queue)
            item = WatcherTooSlow()
        queue.put_nowait(item)

    def _register(self, job_id: str) -> tuple[_JobReader, asyncio.Queue[Any]]:
        self._ensure_listener()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        reader = self.readers.get(job_id)
        if reader is None:
            reader = self.readers[job_id] = _JobReader(job_id)
            reader.queues.add(queue)
            reader.task = asyncio.get_running_loop().create_task(self._run_reader(reader))
        else:
            reader.queues.add(queue)
        return reader, queue

    def _unregister(self, reader: _JobReader, queue: asyncio.Queue[Any]) -> None:
        reader.queues.discard(queue)
        if not reader.queues:
            if reader.task is not None:
                reader.task.cancel()
            if self.readers.get(reader.job_id) is reader:
                del self.readers[reader.job_id]

    # ----------------------------------------------------------------- what a watcher sees

    async def watch(self, job_id: str, after: int) -> AsyncIterator[JobEvent | StreamEnd | None]:
        """Events of `job_id` after `after`, in order, then one `StreamEnd` once the job is
        final and its events are sent. Yields None after 15 s of silence (the caller sends a
        keepalive). Raises `StreamInterrupted` when this watcher is dropped."""
        reader, queue = self._register(job_id)
        try:
            while not reader.positioned.is_set():  # the reader's start may wait out an outage
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.positioned.wait(), KEEPALIVE_S)
                if not reader.positioned.is_set():
                    yield None
            caught_up = reader.last_seq  # the queue holds every event after this one
            while after < caught_up:
                rows = await self._with_retries(self._read_backlog, job_id, after, caught_up)
                if not rows:
                    break
                for row in rows:
                    yield row
                after = rows[-1].seq
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield None
                    continue
                if isinstance(item, StreamInterrupted):
                    raise item
                if isinstance(item, StreamEnd):
                    yield item
                    return
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
