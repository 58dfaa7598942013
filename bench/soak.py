"""Soak: jobs back to back for a fixed time while faults are injected at a fixed rate; then
jobs completed, attempts per job, events lost, duplicate completions and service overhead.

``--queue`` jobs are kept in flight for ``--minutes`` (a new one is submitted as soon as one
ends), each followed by its own SSE watcher on ``/v1/fine_tuning/jobs/{id}/events`` from the
submit to ``done``, reconnecting with ``Last-Event-ID`` when a stream drops. Every
``--fault-every`` seconds the next fault of the rotation store -> database -> worker is
injected; a fault that does not exist on a backend is skipped and reported as such (the slot
stays empty, so worker kills come at the same rate on both backends):

* store: the worker's S3 traffic goes through `tests.faultproxy.FaultProxy`, switched to
  ``mix`` (each new connection reset or answered ``503 Slow Down`` with probability
  ``--store-fault-rate``) for ``--store-fault-seconds``, then back to ``pass``. Services only:
  the embedded folder store has no connection to break.
* database: ``pg_terminate_backend`` on every connection of the worker (found by its
  ``application_name``), three sweeps 0.5 s apart. Services only: SQLite has no connections
  to kill.
* worker: ``kill -9`` of the worker process. Services: a fresh worker is started at once.
  Embedded: ``api.embedded``'s supervisor restarts it. The sweeper requeues the job once its
  lease (``LEASE_SECONDS=6``) expires, and it resumes from its last checkpoint.

Backends: ``embedded`` is ``make run`` (``api.prestart``, ``worker.prestart``,
``python -m api.embedded``: SQLite, a folder store, the SQLite Celery transport); ``services``
is the `tests.harness` stack (a fresh Postgres database, Redis db ``--redis-db``, moto's S3
server in its own process, the beat, ``uvicorn api.main:app``, one worker). Both run with
``LEASE_SECONDS=6 SWEEP_INTERVAL_SECONDS=1 PROGRESS_INTERVAL_SECONDS=0.5``.

Afterwards, from the database: events lost = stored events of a job its watcher never
received; duplicate events = received more than once; duplicate completions = jobs with more
than one ``succeeded`` transition or more than one adapter. Service overhead follows
`bench/overhead.py` ((wall - engine train() time) / wall), where a job's wall time is its turn
at the worker: from its submit, or from the previous job's end if that came later, to its own
end as the client saw it. A resumed job's engine time counts only the kept work, so work lost
to a kill is overhead.

    .venv/bin/python -m bench.soak --backend both              # as reported: 4 min each
    .venv/bin/python -m bench.soak --backend services --minutes 2 --json soak.json

Exits 1 when an event was lost, a job completed twice, a job had not ended by the end of the
drain (``--drain-timeout``, which outlasts the sweeper's 10-minute republish of a queued job)
or no job completed; 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

from bench.common import (  # noqa: E402
    JOBS_TESTS_REDIS_DB,
    BenchError,
    build_tiny_model,
    pct,
    say,
    table,
    uptime,
)
from bench.overhead import OVERHEAD_TARGET  # noqa: E402
from bench.rawhttp import sse_events, sse_headers  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import session_scope  # noqa: E402
from shared.models import Adapter, Job, JobEvent  # noqa: E402
from shared.storage import make_store  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.harness import (  # noqa: E402
    FAST_SPEC,
    ServiceStack,
    StackError,
    addition_rows,
    free_port,
    inherited_env,
    job_body,
    log_tail,
    moto_server,
    postgres_available,
    process_tree,
    redis_available,
    service_stack,
    settings_from_env,
    stop_process,
    wait_http,
)

BACKENDS = ("embedded", "services")
ROTATION = ("store", "database", "worker")
# What each backend can be made to suffer, and why not the rest.
NOT_APPLICABLE = {
    "embedded": {
        "store": "folder store: no connection to reset",
        "database": "SQLite: no server connections to kill",
    },
    "services": {},
}
SOAK_TIMINGS = {
    "LEASE_SECONDS": "6",
    "SWEEP_INTERVAL_SECONDS": "1",
    "PROGRESS_INTERVAL_SECONDS": "0.5",
    "WORKER_HEARTBEAT_SECONDS": "1",
}
# The faulty store's worker: fail fast, so a fault costs seconds, not the default 30 s timeout.
STORE_CLIENT = {
    "S3_CONNECT_TIMEOUT_SECONDS": "1",
    "S3_READ_TIMEOUT_SECONDS": "2",
    "S3_MAX_ATTEMPTS": "2",
}
WORKER_APP = "qlora-soak-worker"
SOAK_SPEC: dict[str, Any] = {**FAST_SPEC, "max_steps": 20, "checkpoint_steps": 5}
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
JOB_TIMEOUT_S = 900.0  # a watcher's limit: past the sweeper's 10-minute republish of a lost message


# --------------------------------------------------------------------------- records


@dataclass
class FaultRecord:
    at_s: float  # seconds since the soak started
    kind: str
    applied: bool
    detail: str


@dataclass
class JobRecord:
    job_id: str
    t_submit: float  # epoch seconds, client, before the POST
    t_final: float = float("nan")  # the client saw `done`
    status: str = "unfinished"  # until the client saw `done`
    error_code: str | None = None
    attempt: int = 0
    received: list[int] = field(default_factory=list)  # SSE event ids, in arrival order
    reconnects: int = 0
    stored: list[int] = field(default_factory=list)  # event ids in the database
    succeeded_transitions: int = 0
    adapters: int = 0
    engine_s: float = float("nan")  # the adapter's metrics["wall_seconds"]


@dataclass
class BackendReport:
    backend: str
    minutes: float
    fault_every_s: float
    jobs_submitted: int
    succeeded: int
    failed: dict[str, int]  # error code -> jobs
    other_final: dict[str, int]  # cancelled, or not final when the drain gave up
    attempts_mean: float
    attempts_max: int
    attempts: dict[int, int]  # attempts -> jobs
    events_stored: int
    events_received: int
    events_lost: int
    duplicate_events: int
    stream_reconnects: int
    duplicate_completions: int  # jobs with > 1 `succeeded` transition or > 1 adapter
    orphan_adapter_prefixes: int  # adapter folders in the store that no adapter row names
    faults: dict[str, int]  # kind -> injected
    faults_not_applicable: dict[str, str]
    turn_median_s: float
    engine_median_s: float
    overhead_median: float  # per job: (turn - engine) / turn
    overhead_p90: float
    overhead_one_attempt_median: float  # jobs no fault touched enough to requeue
    overhead_all: float  # 1 - sum(engine) / sum(turn): the worker's time not spent training
    wall_s: float
    slowest_job_s: float = float("nan")  # submit -> end: a stall shows here
    slowest_job: str = ""
    lost_by_job: dict[str, list[int]] = field(default_factory=dict)
    fault_log: list[FaultRecord] = field(default_factory=list)


# --------------------------------------------------------------------------- pure accounting


def account_events(received: list[int], stored: list[int]) -> tuple[list[int], int]:
    """(stored ids never received, how many receipts repeated an id already received)."""
    seen = set(received)
    return [s for s in stored if s not in seen], len(received) - len(seen)


def turn_times(jobs: list[JobRecord]) -> dict[str, float]:
    """Each finished job's turn at the (one) worker: from its submit, or from the end of the
    job that finished before it if that came later, to its own end."""
    finished = sorted((j for j in jobs if j.t_final == j.t_final), key=lambda j: j.t_final)
    turns: dict[str, float] = {}
    previous = float("-inf")
    for job in finished:
        turns[job.job_id] = job.t_final - max(job.t_submit, previous)
        previous = job.t_final
    return turns


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(
    backend: str,
    jobs: list[JobRecord],
    faults: list[FaultRecord],
    *,
    minutes: float,
    fault_every_s: float,
    orphans: int,
    wall_s: float,
) -> BackendReport:
    lost_by_job: dict[str, list[int]] = {}
    duplicates = 0
    for job in jobs:
        lost, dupes = account_events(job.received, job.stored)
        duplicates += dupes
        if lost:
            lost_by_job[job.job_id] = lost
    turns = turn_times(jobs)
    ok = [j for j in jobs if j.status == "succeeded" and j.engine_s == j.engine_s]
    overheads = {j.job_id: (turns[j.job_id] - j.engine_s) / turns[j.job_id] for j in ok}
    attempts = [j.attempt for j in jobs]
    applied = Counter(f.kind for f in faults if f.applied)
    ended = [j for j in jobs if j.t_final == j.t_final]
    slowest = max(ended, key=lambda j: j.t_final - j.t_submit, default=None)
    return BackendReport(
        backend=backend,
        minutes=minutes,
        fault_every_s=fault_every_s,
        jobs_submitted=len(jobs),
        succeeded=sum(j.status == "succeeded" for j in jobs),
        failed=dict(Counter(j.error_code or "?" for j in jobs if j.status == "failed")),
        other_final=dict(
            Counter(j.status for j in jobs if j.status not in ("succeeded", "failed"))
        ),
        attempts_mean=statistics.fmean(attempts) if attempts else float("nan"),
        attempts_max=max(attempts, default=0),
        attempts=dict(sorted(Counter(attempts).items())),
        events_stored=sum(len(j.stored) for j in jobs),
        events_received=sum(len(j.received) for j in jobs),
        events_lost=sum(len(v) for v in lost_by_job.values()),
        duplicate_events=duplicates,
        stream_reconnects=sum(j.reconnects for j in jobs),
        duplicate_completions=sum(j.succeeded_transitions > 1 or j.adapters > 1 for j in jobs),
        orphan_adapter_prefixes=orphans,
        faults={kind: applied.get(kind, 0) for kind in ROTATION},
        faults_not_applicable=dict(NOT_APPLICABLE.get(backend, {})),
        turn_median_s=_median([turns[j.job_id] for j in ok]),
        engine_median_s=_median([j.engine_s for j in ok]),
        overhead_median=_median(list(overheads.values())),
        overhead_p90=pct(list(overheads.values()), 90),
        overhead_one_attempt_median=_median([overheads[j.job_id] for j in ok if j.attempt == 1]),
        overhead_all=(
            1 - sum(j.engine_s for j in ok) / sum(turns[j.job_id] for j in ok)
            if ok
            else float("nan")
        ),
        wall_s=wall_s,
        slowest_job_s=float("nan") if slowest is None else slowest.t_final - slowest.t_submit,
        slowest_job="" if slowest is None else slowest.job_id,
        lost_by_job=lost_by_job,
        fault_log=faults,
    )


def failures(report: BackendReport) -> list[str]:
    """What makes the soak fail: a lost event, a job completed twice, nothing completed."""
    out = []
    if report.events_lost:
        out.append(f"{report.backend}: {report.events_lost} events lost {report.lost_by_job}")
    if report.duplicate_completions:
        out.append(f"{report.backend}: {report.duplicate_completions} jobs completed twice")
    unfinished = report.other_final.get("unfinished", 0)
    if unfinished:
        out.append(f"{report.backend}: {unfinished} jobs did not end within the drain")
    if report.succeeded == 0:
        out.append(f"{report.backend}: no job completed")
    return out


def _pct(value: float) -> str:
    return "-" if value != value else f"{value * 100:.1f}%"


def _counts(counts: dict[Any, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "0"


def report_table(reports: list[BackendReport]) -> str:
    def row(name: str, fn: Any) -> list[object]:
        return [name, *(fn(r) for r in reports)]

    def faults(r: BackendReport) -> str:
        return ", ".join(
            f"{k} n/a" if k in r.faults_not_applicable else f"{k} {r.faults[k]}" for k in ROTATION
        )

    rows = [
        row("soak", lambda r: f"{r.minutes:g} min, a fault every {r.fault_every_s:g} s"),
        row("faults injected", faults),
        row("jobs submitted", lambda r: r.jobs_submitted),
        row("succeeded", lambda r: r.succeeded),
        row("failed (code: jobs)", lambda r: _counts(r.failed)),
        row("other end states", lambda r: _counts(r.other_final)),
        row("attempts per job, mean / max", lambda r: f"{r.attempts_mean:.2f} / {r.attempts_max}"),
        row("jobs by attempts", lambda r: _counts(r.attempts)),
        row("events stored / received", lambda r: f"{r.events_stored} / {r.events_received}"),
        row("events lost (must be 0)", lambda r: r.events_lost),
        row("duplicate events received", lambda r: r.duplicate_events),
        row("SSE reconnects", lambda r: r.stream_reconnects),
        row("duplicate completions (must be 0)", lambda r: r.duplicate_completions),
        row("orphan adapter folders in the store", lambda r: r.orphan_adapter_prefixes),
        row(
            "turn / engine per job, median",
            lambda r: f"{r.turn_median_s:.2f} / {r.engine_median_s:.2f} s",
        ),
        row("slowest job, submit -> end", lambda r: f"{r.slowest_job_s:.1f} s"),
        row(
            "overhead per job, median / p90",
            lambda r: f"{_pct(r.overhead_median)} / {_pct(r.overhead_p90)}",
        ),
        row("overhead, one-attempt jobs, median", lambda r: _pct(r.overhead_one_attempt_median)),
        row("overhead, whole soak (1 - engine/turns)", lambda r: _pct(r.overhead_all)),
    ]
    return table(["", *(r.backend for r in reports)], rows)


# --------------------------------------------------------------------------- backends


class SoakTarget(Protocol):
    """A running service the soak submits to and injects faults into."""

    name: str
    url: str
    admin: dict[str, str]
    settings: Settings  # this process's view: the same database and store
    logs: Path
    started: float  # monotonic: when the fault window opened

    def inject(self, kind: str) -> FaultRecord: ...

    def check(self) -> None: ...


def _record(started: float, kind: str, applied: bool, detail: str) -> FaultRecord:
    return FaultRecord(round(time.monotonic() - started, 1), kind, applied, detail)


class ServicesTarget:
    """The harness's services stack, its worker's S3 traffic through a fault proxy and its
    database connections named, so that both can be broken."""

    name = "services"

    def __init__(self, stack: ServiceStack, proxy: FaultProxy, args: argparse.Namespace):
        self.stack, self.proxy, self.args = stack, proxy, args
        self.url, self.admin, self.settings = stack.url, stack.admin, stack.settings
        self.logs = stack.logs
        self.started = time.monotonic()
        sep = "&" if "?" in stack.settings.database_url else "?"
        self.worker_env = {
            "DATABASE_URL": f"{stack.settings.database_url}{sep}application_name={WORKER_APP}",
            "S3_ENDPOINT_URL": proxy.url,
            **STORE_CLIENT,
        }
        self.admin_db = create_engine(stack.settings.database_url)
        self.kills = 0

    def start_worker(self, *, wait_ready: bool) -> None:
        self.stack.start_worker(wait_ready=wait_ready, **self.worker_env)

    def inject(self, kind: str) -> FaultRecord:
        if kind == "store":
            before = self.proxy.snapshot()
            self.proxy.set_mode("mix", fault_rate=self.args.store_fault_rate)
            time.sleep(self.args.store_fault_seconds)
            self.proxy.set_mode("pass")
            after = self.proxy.snapshot()
            faulted = after["faults"] - before["faults"]
            conns = after["connections"] - before["connections"]
            return _record(
                self.started,
                kind,
                True,
                f"{faulted} of {conns} connections faulted in {self.args.store_fault_seconds:g} s"
                f" (rate {self.args.store_fault_rate:g})",
            )
        if kind == "database":
            killed = 0
            for _ in range(3):
                with self.admin_db.connect() as conn:
                    killed += len(
                        conn.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = :app"
                            ),
                            {"app": WORKER_APP},
                        ).all()
                    )
                time.sleep(0.5)
            return _record(self.started, kind, True, f"{killed} worker connections terminated")
        proc = self.stack.process("worker")
        if proc is None:
            return _record(self.started, kind, False, "no worker running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.kills += 1
        self.start_worker(wait_ready=False)
        return _record(self.started, kind, True, f"kill -9 worker pid {proc.pid}; new one started")

    def check(self) -> None:
        self.stack.check_alive("api")
        self.stack.check_alive("beat")

    def close(self) -> None:
        self.admin_db.dispose()


class EmbeddedTarget:
    """`make run`: prestart, then `python -m api.embedded` supervising API, worker and beat."""

    name = "embedded"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = inherited_env(
            VAR_DIR=str(work / "var"),
            PORT=str(port),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            **SOAK_TIMINGS,
        )
        self.settings = settings_from_env(self.env)
        self.process: subprocess.Popen[bytes] | None = None
        self.admin: dict[str, str] = {}
        self.started = time.monotonic()

    def start(self) -> None:
        for module in ("api.prestart", "worker.prestart"):
            done = subprocess.run(
                [sys.executable, "-m", module],
                cwd=ROOT,
                env=self.env,
                capture_output=True,
                timeout=600,
                check=False,
            )
            (self.logs / f"{module}.log").write_bytes(done.stdout + done.stderr)
            if done.returncode != 0:
                raise BenchError(f"{module} failed:\n{done.stderr.decode()[-3000:]}")
        log = self.logs / "make-run.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.embedded"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http(f"{self.url}/readyz", proc=self.process, log=log, timeout=120)
        key = (self.work / "var" / "admin_api_key").read_text().strip()
        self.admin = {"Authorization": f"Bearer {key}"}
        self.started = time.monotonic()

    def worker_pid(self) -> int | None:
        assert self.process is not None
        for pid in process_tree(self.process.pid)[1:]:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"worker.main" in argv and b"worker" in argv:
                    return pid
        return None

    def inject(self, kind: str) -> FaultRecord:
        if kind in NOT_APPLICABLE["embedded"]:
            return _record(self.started, kind, False, NOT_APPLICABLE["embedded"][kind])
        pid = self.worker_pid()
        if pid is None:
            return _record(self.started, kind, False, "no worker running (being restarted)")
        os.kill(pid, signal.SIGKILL)
        return _record(self.started, kind, True, f"kill -9 worker pid {pid}; supervisor restarts")

    def wait_for_worker(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        log = self.logs / "make-run.log"
        while " ready." not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise BenchError(f"the embedded worker did not start:\n{log_tail(log)}")
            time.sleep(0.3)

    def check(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise BenchError(f"api.embedded exited:\n{log_tail(self.logs / 'make-run.log')}")

    def close(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout=60)


# --------------------------------------------------------------------------- the soak


def new_tenant(target: SoakTarget) -> dict[str, str]:
    with httpx.Client(base_url=target.url, headers=target.admin, timeout=60) as c:
        tenant = c.post("/admin/tenants", json={"name": "soak", "max_running_jobs": 4})
        if tenant.status_code != 201:
            raise BenchError(f"POST /admin/tenants: {tenant.status_code} {tenant.text}")
        key = c.post(f"/admin/tenants/{tenant.json()['id']}/keys")
        if key.status_code != 201:
            raise BenchError(f"POST keys: {key.status_code} {key.text}")
    return {"Authorization": f"Bearer {key.json()['key']}"}


def upload_rows(target: SoakTarget, headers: dict[str, str], seed: int) -> str:
    body = "".join(json.dumps(r) + "\n" for r in addition_rows(200, seed=seed)).encode()
    with httpx.Client(base_url=target.url, headers=headers, timeout=60) as c:
        resp = c.post(
            "/v1/files", files={"file": ("soak.jsonl", body)}, data={"purpose": "fine-tune"}
        )
    if resp.status_code != 200:
        raise BenchError(f"POST /v1/files: {resp.status_code} {resp.text}")
    file_id: str = resp.json()["id"]
    return file_id


async def follow(client: httpx.AsyncClient, headers: dict[str, str], job: JobRecord) -> None:
    """Read the job's SSE stream to `done`, reconnecting with Last-Event-ID after a drop."""
    url = f"/v1/fine_tuning/jobs/{job.job_id}/events"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        sse = sse_headers(headers)
        if job.received:
            sse["Last-Event-ID"] = str(job.received[-1])
        try:
            async with client.stream("GET", url, headers=sse) as resp:
                if resp.status_code == 200:
                    async for event in sse_events(resp):
                        if event.type == "done":
                            job.t_final = time.time()
                            job.status = str(event.data.get("status"))
                            return
                        assert event.seq is not None
                        job.received.append(event.seq)
                else:
                    await resp.aread()
                    say(f"  {job.job_id}: SSE HTTP {resp.status_code} {resp.text[:200]}")
        except httpx.HTTPError as exc:
            say(f"  {job.job_id}: SSE dropped ({type(exc).__name__}); reconnecting")
        if time.monotonic() > deadline:
            raise BenchError(f"{job.job_id}: no `done` in {JOB_TIMEOUT_S:.0f}s")
        job.reconnects += 1
        await asyncio.sleep(0.5)


async def run_slot(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    body: dict[str, Any],
    until: float,
    jobs: list[JobRecord],
) -> None:
    """Submit a job, follow it to its end, repeat until `until` (monotonic)."""
    while time.monotonic() < until:
        t_submit = time.time()
        resp = await client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        if resp.status_code != 200:
            raise BenchError(f"POST /v1/fine_tuning/jobs: {resp.status_code} {resp.text}")
        job = JobRecord(resp.json()["id"], t_submit)
        jobs.append(job)
        await follow(client, headers, job)
        got = (await client.get(f"/v1/fine_tuning/jobs/{job.job_id}", headers=headers)).json()
        job.attempt = int(got["attempt"])
        job.error_code = (got.get("error") or {}).get("code")
        say(
            f"  {job.job_id}: {job.status} after {job.t_final - job.t_submit:.1f}s, "
            f"attempt {job.attempt}{', ' + job.error_code if job.error_code else ''}"
        )


async def inject_faults(
    target: SoakTarget, every: float, until: float, log: list[FaultRecord]
) -> None:
    """The rotation's next fault at every multiple of `every` seconds until `until`."""
    start = target.started = time.monotonic()  # fault times count from here
    for n in range(1, 1_000_000):
        at = start + n * every
        if at >= until:
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            return
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        record = await asyncio.to_thread(target.inject, ROTATION[(n - 1) % len(ROTATION)])
        record.at_s = round(at - start, 1)  # when it began (a store fault lasts seconds)
        log.append(record)
        say(f"  fault at {record.at_s:.0f}s: {record.kind}: {record.detail}")


async def soak(
    target: SoakTarget, headers: dict[str, str], file_id: str, args: argparse.Namespace
) -> tuple[list[JobRecord], list[FaultRecord]]:
    jobs: list[JobRecord] = []
    faults: list[FaultRecord] = []
    body = {**job_body(file_id, spec=SOAK_SPEC, suffix="soak"), "seed": args.seed}
    until = time.monotonic() + args.minutes * 60
    async with httpx.AsyncClient(base_url=target.url, timeout=httpx.Timeout(60.0)) as client:
        slots = [
            asyncio.create_task(run_slot(client, headers, body, until, jobs))
            for _ in range(args.queue)
        ]
        injector = asyncio.create_task(inject_faults(target, args.fault_every, until, faults))
        await injector
        say(f"\nfault window over; draining {sum(j.t_final != j.t_final for j in jobs)} jobs")
        done, pending = await asyncio.wait(slots, timeout=args.drain_timeout)
        for task in pending:  # its job stays `unfinished` in the report
            task.cancel()
        if pending:
            say(f"drain gave up after {args.drain_timeout:.0f}s on {len(pending)} jobs")
        for task in done:
            task.result()  # a slot's BenchError ends the soak
    return jobs, faults


def read_back(settings: Settings, jobs: list[JobRecord]) -> int:
    """Fill in what the database says about each job; returns the orphan adapter folders."""
    ids = [j.job_id for j in jobs]
    with session_scope(settings) as session:
        for job_id, attempt, code in session.execute(
            select(Job.id, Job.attempt, Job.error_code).where(Job.id.in_(ids))
        ):
            record = next(j for j in jobs if j.job_id == job_id)
            record.attempt, record.error_code = int(attempt), code
        events = session.execute(
            select(JobEvent.job_id, JobEvent.seq, JobEvent.data)
            .where(JobEvent.job_id.in_(ids))
            .order_by(JobEvent.seq)
        ).all()
        adapters = dict(
            session.execute(
                select(Adapter.job_id, func.count())
                .where(Adapter.job_id.in_(ids))
                .group_by(Adapter.job_id)
            ).all()
        )
        metrics: dict[str, dict[str, Any]] = {
            job_id: data
            for job_id, data in session.execute(
                select(Adapter.job_id, Adapter.metrics).where(Adapter.job_id.in_(ids))
            )
        }
        tenants = set(session.scalars(select(Adapter.tenant_id).where(Adapter.job_id.in_(ids))))
        prefixes = set(
            session.scalars(select(Adapter.storage_prefix).where(Adapter.job_id.in_(ids)))
        )
    by_job = {j.job_id: j for j in jobs}
    for job_id, seq, data in events:
        job = by_job[job_id]
        job.stored.append(int(seq))
        if (data or {}).get("status") == "succeeded" and "from" in (data or {}):
            job.succeeded_transitions += 1
    for job in jobs:
        job.adapters = int(adapters.get(job.job_id, 0))
        if job.job_id in metrics:
            job.engine_s = float(metrics[job.job_id]["wall_seconds"])
    # Only listed: the folder store wants a signing secret it will not use here.
    store = make_store(settings, signing_secret=settings.signing_secret or "soak-listing-only")
    found = set()
    for tenant in tenants:
        for key in store.list_keys(f"adapters/{tenant}/"):
            found.add("/".join(key.split("/")[:3]))
    return len(found - {p.rstrip("/") for p in prefixes})


def measure(target: SoakTarget, args: argparse.Namespace) -> BackendReport:
    headers = new_tenant(target)
    file_id = upload_rows(target, headers, args.seed)
    say(
        f"\n== {target.name}: {args.minutes:g} min, {args.queue} jobs in flight, a fault every "
        f"{args.fault_every:g} s ({' -> '.join(ROTATION)}); {uptime()}"
    )
    started = time.monotonic()
    jobs, faults = asyncio.run(soak(target, headers, file_id, args))
    wall = time.monotonic() - started
    target.check()
    orphans = read_back(target.settings, jobs)
    return summarize(
        target.name,
        jobs,
        faults,
        minutes=args.minutes,
        fault_every_s=args.fault_every,
        orphans=orphans,
        wall_s=wall,
    )


@contextlib.contextmanager
def services_target(args: argparse.Namespace, work: Path) -> Iterator[ServicesTarget]:
    for name, ok in (("Postgres", postgres_available()), ("Redis", redis_available())):
        if not ok:
            raise BenchError(f"{name} is not reachable (see tests/harness/backends.py for URLs)")
    with moto_server(log=work / "logs" / "moto.log") as s3:
        model_dir = build_tiny_model(work / "models" / "tiny-llama")
        with service_stack(
            work, s3=s3, model_dir=model_dir, redis_dbs=(args.redis_db,), env=SOAK_TIMINGS
        ) as stack:
            host, port = s3.endpoint_url.removeprefix("http://").rsplit(":", 1)
            proxy = FaultProxy((host, int(port)), seed=args.seed).start()
            target = ServicesTarget(stack, proxy, args)
            try:
                target.start_worker(wait_ready=True)
                target.started = time.monotonic()
                yield target
            finally:
                proxy.stop()
                target.close()


@contextlib.contextmanager
def embedded_target(work: Path) -> Iterator[EmbeddedTarget]:
    target = EmbeddedTarget(work)
    try:
        target.start()
        target.wait_for_worker()
        yield target
    finally:
        target.close()


def run_backend(backend: str, args: argparse.Namespace) -> BackendReport:
    work = Path(tempfile.mkdtemp(prefix=f"bench-soak-{backend}-"))
    try:
        if backend == "services":
            with services_target(args, work) as services:
                return measure(services, args)
        with embedded_target(work) as embedded:
            return measure(embedded, args)
    finally:
        if args.keep_logs:
            say(f"{backend}: logs kept in {work / 'logs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def command_line() -> str:
    """The command as `python -m bench.soak ...`, however it was started."""
    python = os.path.relpath(sys.executable, ROOT)
    return f"$ {shlex.join([python, '-m', 'bench.soak', *sys.argv[1:]])}"


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    say(command_line())
    say(f"machine: {uptime()}; {os.cpu_count()} cores")
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    reports: list[BackendReport] = []
    try:
        for backend in backends:
            reports.append(run_backend(backend, args))
    except (BenchError, StackError) as exc:
        say(f"\nsoak failed: {exc}")
        return 2
    except KeyboardInterrupt:
        say("\ninterrupted; processes stopped")
        return 130
    problems = [p for r in reports for p in failures(r)]
    say("\n==== report")
    say(report_table(reports))
    for r in reports:
        for kind, why in r.faults_not_applicable.items():
            say(f"- {r.backend}: {kind} faults not applicable ({why})")
    say(f"- overhead target of bench/overhead.py: < {OVERHEAD_TARGET * 100:.0f}% (fault-free)")
    say(f"- machine after: {uptime()}; total {time.monotonic() - started:.0f}s")
    for line in problems:
        say(f"- FAILED: {line}")
    if args.json:
        payload = {
            "command": command_line(),
            "seed": args.seed,
            "backends": {r.backend: asdict(r) for r in reports},
            "failures": problems,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        say(f"- JSON written to {args.json}")
    return 1 if problems else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    p.add_argument("--minutes", type=float, default=4.0, help="fault window per backend")
    p.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults")
    p.add_argument("--seed", type=int, default=0, help="training data, jobs and fault proxy")
    p.add_argument("--queue", type=int, default=2, help="jobs kept in flight")
    p.add_argument("--store-fault-rate", type=float, default=0.3)
    p.add_argument("--store-fault-seconds", type=float, default=5.0)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=720.0,
        help="seconds to wait for the jobs in flight after the fault window; the default "
        "outlasts the sweeper's 10-minute republish of a queued job whose message was lost",
    )
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--redis-db", type=int, default=12, help="Redis database (flushed!)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work dirs with the logs")
    args = p.parse_args(argv)
    if args.redis_db == JOBS_TESTS_REDIS_DB:
        p.error(f"Redis db {JOBS_TESTS_REDIS_DB} belongs to the jobs tests; pick another")
    if args.store_fault_seconds >= args.fault_every:
        p.error("--store-fault-seconds must be shorter than --fault-every")
    return args


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
