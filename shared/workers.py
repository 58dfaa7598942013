"""The worker fleet: who consumes which GPU-class queue, what it can hold, when last heard of.

Workers announce themselves in `workers` (one row per process, keyed by its lease-owner name)
and heartbeat it. A worker unheard of for `worker_stale_seconds` is not live; its row is pruned
after `PRUNE_AFTER_STALE_FACTOR` times that, so `/admin/workers` shows it as stale a while first.
Admission and the sweeper ask this module whether anyone serves a job's queue. Services only
flush; the caller commits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared.broker import CPU_QUEUE, GPU_QUEUES, queue_for_class
from shared.config import Settings
from shared.estimate import GIB, GPU_CLASSES
from shared.events import record_event
from shared.models import Job, JobEvent, Worker, utcnow

AUTO = "auto"
# A "24 GB" card reports about 23.6 GiB and a 24 GiB machine about 23.5 GiB of RAM (the
# kernel keeps some): a worker holds a class when its memory is within this fraction of it.
NOMINAL_SIZE_TOLERANCE = 0.08
PRUNE_AFTER_STALE_FACTOR = 10
NO_LIVE_WORKER = "no_live_worker"
QUEUED = "queued"  # the job status (shared.jobs.states.JobStatus.QUEUED)
DEVICE_CHARS = 64


# --- capacity and queues ---------------------------------------------------------------------


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_ram_bytes() -> int:
    """RAM the kernel reports available now (`MemAvailable`: free plus reclaimable cache),
    else the free pages."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cuda_capacity() -> tuple[str, int] | None:
    try:
        import torch
    except ImportError:  # the API image has no torch
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"cuda:0 {props.name}"[:DEVICE_CHARS], int(props.total_memory)


def detect_capacity(settings: Settings) -> tuple[str, int]:
    """(device, memory bytes): cuda:0 and its VRAM, else `cpu` and the machine's RAM.

    `WORKER_MEMORY_BYTES` overrides the memory (not the device)."""
    device, memory = _cuda_capacity() or ("cpu", total_ram_bytes())
    return device, settings.worker_memory_bytes or memory


def holds_class(memory_bytes: int, class_bytes: int) -> bool:
    return memory_bytes >= class_bytes * (1 - NOMINAL_SIZE_TOLERANCE)


def resolve_queues(settings: Settings, device: str, memory_bytes: int) -> list[str]:
    """The queues to consume. `auto` stands for `cpu` plus every GPU class the memory holds
    (VRAM on a GPU, RAM on a CPU); names listed beside it and explicit lists are kept as given."""
    queues: list[str] = []
    for name in settings.queues:
        if name.lower() != AUTO:
            queues.append(name)
            continue
        queues.append(CPU_QUEUE)
        queues += [
            queue_for_class(cls)
            for cls, size in GPU_CLASSES.items()
            if holds_class(memory_bytes, size)
        ]
    return list(dict.fromkeys(queues)) or [CPU_QUEUE]


# --- the fleet table -------------------------------------------------------------------------


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything here is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def is_live(worker: Worker, settings: Settings, now: datetime | None = None) -> bool:
    age = (now or utcnow()) - aware(worker.heartbeat_at)
    return age.total_seconds() <= settings.worker_stale_seconds


def register(
    session: Session,
    *,
    worker_id: str,
    hostname: str,
    queues: list[str],
    device: str,
    memory_bytes: int,
) -> Worker:
    """Announce a worker (again, if its row was pruned while it was frozen)."""
    now = utcnow()
    worker = session.get(Worker, worker_id)
    if worker is None:
        worker = Worker(id=worker_id, started_at=now)
        session.add(worker)
    worker.hostname = hostname
    worker.queues = list(queues)
    worker.device = device[:DEVICE_CHARS]
    worker.memory_bytes = memory_bytes
    worker.heartbeat_at = now
    session.flush()
    return worker


def heartbeat(session: Session, *, worker_id: str, current_job_id: str | None) -> bool:
    """Refresh a worker's row; False when it has none (pruned: register it again)."""
    result = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=utcnow(), current_job_id=current_job_id)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def unregister(session: Session, *, worker_id: str) -> bool:
    result = session.execute(delete(Worker).where(Worker.id == worker_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.started_at, Worker.id)))


def live_workers(session: Session, settings: Settings, queue: str | None = None) -> list[Worker]:
    """Workers heard of within `worker_stale_seconds`, optionally only those serving `queue`."""
    since = utcnow() - timedelta(seconds=settings.worker_stale_seconds)
    rows = session.scalars(
        select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.started_at, Worker.id)
    )
    return [w for w in rows if queue is None or queue in (w.queues or [])]


def served_queues(session: Session, settings: Settings) -> set[str]:
    return {q for w in live_workers(session, settings) for q in (w.queues or [])}


def idle_queues(session: Session, settings: Settings) -> set[str]:
    """Queues with a live worker that reports no current job."""
    live = live_workers(session, settings)
    return {q for w in live if w.current_job_id is None for q in (w.queues or [])}


def prune_stale(session: Session, settings: Settings) -> int:
    """Delete workers unheard of for `PRUNE_AFTER_STALE_FACTOR` times `worker_stale_seconds`."""
    horizon = timedelta(seconds=settings.worker_stale_seconds * PRUNE_AFTER_STALE_FACTOR)
    result = session.execute(delete(Worker).where(Worker.heartbeat_at < utcnow() - horizon))
    return int(result.rowcount)  # type: ignore[attr-defined]


# --- admission and unserved jobs -------------------------------------------------------------


def how_to_serve(queue: str) -> str:
    """What an operator starts so that `queue` gets a worker."""
    size = GPU_CLASSES.get(queue.removeprefix("gpu-"))
    if size is None:
        return (
            f"start a worker with WORKER_QUEUES={queue} (WORKER_QUEUES=auto includes {CPU_QUEUE})"
        )
    return (
        f"start a worker with WORKER_QUEUES={queue} (or WORKER_QUEUES=auto on a machine with "
        f"at least {size // GIB} GiB of GPU memory)"
    )


def no_worker_note(queue: str) -> str:
    return f"no live worker serves {queue}; {how_to_serve(queue)}"


def admission(session: Session, settings: Settings, queue: str) -> dict[str, Any]:
    """Who serves `queue` right now, for the job's estimate: `{"queue", "live_workers"}`
    plus a `note` saying what to start when nobody does."""
    count = len(live_workers(session, settings, queue))
    answer: dict[str, Any] = {"queue": queue, "live_workers": count}
    if count == 0:
        answer["note"] = no_worker_note(queue)
    return answer


def record_no_live_worker(session: Session, job: Job) -> None:
    record_event(
        session,
        job,
        f"The job waits: {no_worker_note(job.gpu_class)}",
        level="warn",
        data={"code": NO_LIVE_WORKER, "queue": job.gpu_class},
    )


def note_admission(session: Session, settings: Settings, job: Job) -> dict[str, Any]:
    """Store `admission` in a just-queued job's estimate and, when nobody serves its queue,
    record the no-live-worker event (after the queued event, so the sweeper does not repeat it)."""
    answer = admission(session, settings, job.gpu_class)
    job.estimate = {**(job.estimate or {}), "admission": answer}
    session.flush()
    if answer["live_workers"] == 0:
        record_no_live_worker(session, job)
    return answer


def _latest_seq_by_job(
    session: Session, job_ids: list[str], key: str, value: str
) -> dict[str, int]:
    rows = session.execute(
        select(JobEvent.job_id, func.max(JobEvent.seq))
        .where(JobEvent.job_id.in_(job_ids), JobEvent.data[key].as_string() == value)
        .group_by(JobEvent.job_id)
    )
    return {job_id: seq for job_id, seq in rows}


def flag_unserved_jobs(session: Session, settings: Settings) -> list[str]:
    """Record one no-live-worker event on each queued job whose queue no live worker serves,
    unless it already got one since it was last queued. Returns the flagged job ids."""
    served = served_queues(session, settings)
    waiting = session.scalars(
        select(Job).where(Job.status == QUEUED, Job.gpu_class.not_in(sorted(served)))
    ).all()
    if not waiting:
        return []
    ids = [job.id for job in waiting]
    queued_at = _latest_seq_by_job(session, ids, "status", QUEUED)
    flagged_at = _latest_seq_by_job(session, ids, "code", NO_LIVE_WORKER)
    flagged: list[str] = []
    for job in waiting:
        if flagged_at.get(job.id, -1) > queued_at.get(job.id, 0):
            continue
        # Lock and re-read: a worker may have claimed it since the select above.
        status = session.scalar(select(Job.status).where(Job.id == job.id).with_for_update())
        if status != QUEUED:
            continue
        record_no_live_worker(session, job)
        flagged.append(job.id)
    return flagged


# --- queue gauges ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueStats:
    queue: str
    depth: int
    oldest_queued_seconds: float
    live_workers: int


def queue_stats(session: Session, settings: Settings) -> list[QueueStats]:
    """Per queue: queued jobs, age of the longest-waiting one (since it was last queued), live
    workers. Every known class is listed, with zeros when idle."""
    now = utcnow()
    waiting = session.execute(
        select(Job.id, Job.gpu_class, Job.created_at).where(Job.status == QUEUED)
    ).all()
    last_queued: dict[str, datetime] = {}
    if waiting:
        rows = session.execute(
            select(JobEvent.job_id, func.max(JobEvent.created_at))
            .where(
                JobEvent.job_id.in_([row.id for row in waiting]),
                JobEvent.data["status"].as_string() == QUEUED,
            )
            .group_by(JobEvent.job_id)
        )
        last_queued = {job_id: aware(at) for job_id, at in rows}
    depth: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for job_id, queue, created_at in waiting:
        since = last_queued.get(job_id, aware(created_at))
        depth[queue] = depth.get(queue, 0) + 1
        oldest[queue] = max(oldest.get(queue, 0.0), (now - since).total_seconds())
    live: dict[str, int] = {}
    for worker in live_workers(session, settings):
        for queue in worker.queues or []:
            live[queue] = live.get(queue, 0) + 1
    names = _known_queues([*depth, *live])
    return [QueueStats(q, depth.get(q, 0), oldest.get(q, 0.0), live.get(q, 0)) for q in names]


def _known_queues(extra: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([CPU_QUEUE, *GPU_QUEUES, *sorted(extra)]))
