"""Service benchmark: submit latency/throughput, queue latency, service overhead, SSE fan-out.

Brings the whole service up as real processes, the way `tests/jobs/conftest.py` does: a fresh
Postgres database (`tests.services.temporary_postgres_database`), Redis on 127.0.0.1:6379 in a
database of its own (``--redis-db``, default 12; only that database is flushed), moto's S3
server in its own process, migrations, the tiny base model registered as `tiny-llama`, then
``uvicorn api.main:app --workers N``, ``python -m worker.main beat`` and (for the parts that
train) one ``python -m worker.main worker``.

Parts (``--only``, comma-separated; run in this order whatever the order given):

* ``queue``: submit -> ``running`` over N sequential one-step jobs (after one warm-up job), each
  waited on until it succeeds and submitted once the worker is really idle (its task returned,
  seen in its log); then a few jobs back to back (submitted as soon as the previous one was
  seen `succeeded`). `running` is seen on the job's SSE stream (or by polling every 20 ms with
  ``--queue-detect poll``); server-side figures come from the events' stored timestamps.
* ``overhead``: (job wall time - engine time) / job wall time, median of 3 jobs per size
  (``--overhead-steps 30,150``), with a phase breakdown from stored timestamps and the
  adapter's metrics (`wall_seconds` = the engine's whole `train()`).
* ``sse``: delivery latency of events written by this process at a fixed rate to 200
  concurrent watchers of one queued job, against 1 watcher; checks loss, dupes and order.
* ``submit``: ``POST /v1/fine_tuning/jobs`` under 50 concurrent clients against ``GET /healthz``
  and an authenticated ``GET /v1/fine_tuning/jobs/{id}``, same API, same concurrency; plus
  ``GET /healthz`` through httpx.AsyncClient (what that client costs) and an in-process,
  sequential breakdown of one POST's server time.

The submit and sse clients are a minimal asyncio HTTP/1.1 client (`RawHttp`) by default:
httpx.AsyncClient spends more CPU per request than the API's bare endpoint does, and client and
server share the machine's cores. The worker is stopped before ``sse`` and ``submit`` (their
jobs must stay queued). Every part prints CPU seconds per process group over its window,
including "other" (processes outside the benchmark): on a shared machine, read those first.

    .venv/bin/python bench/service.py                       # everything, API --workers 1
    .venv/bin/python bench/service.py --api-workers 1,2 --overhead-steps 30,150   # as reported
    .venv/bin/python bench/service.py --only submit,sse --api-workers 1,2

Exits non-zero when a part fails outright (a job fails, an SSE watcher loses events, a request
errors); missing the 5 % overhead target is reported but does not change the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/service.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from sqlalchemy import select, text  # noqa: E402

from api.prestart import migrate  # noqa: E402
from bench.procs import stop_process  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import session_scope  # noqa: E402
from shared.events import configure_publisher, record_event  # noqa: E402
from shared.models import Job, JobEvent  # noqa: E402
from shared.tenancy import service as tenancy  # noqa: E402
from tests import services  # noqa: E402

PARTS = ("queue", "overhead", "sse", "submit")  # execution order
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ADMIN_KEY = "bench-admin-key-" + uuid.uuid4().hex
SIGNING_SECRET = "bench-signing-secret-" + uuid.uuid4().hex
S3_KEY = "testing"
OVERHEAD_TARGET = 0.05
POLL_INTERVAL_S = 0.02
DRAIN_IDLE_S = 20.0  # SSE: give up on undelivered events after this long without progress
DRAIN_MAX_S = 240.0
IDLE_GAP_S = 0.3  # after the worker is free, before the next "idle worker" submit
JOB_TIMEOUT_S = 600.0
# A one-step job: what the queue-latency part submits (and, with more steps, the overhead part).
QUEUE_SPEC: dict[str, Any] = {
    "max_steps": 1,
    "checkpoint_steps": None,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "compute_dtype": "float32",
    "max_seq_length": 32,
    "validation_fraction": 0,
}
# Settings fields (shared/config.py) are dropped from the inherited environment so nothing outside
# the benchmark can point its processes at another database, broker or store.
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)


class BenchError(RuntimeError):
    """A benchmark step failed outright (a job failed, a stream lost events)."""


# --------------------------------------------------------------------------- small helpers


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"  # nan -> "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def say(message: str = "") -> None:
    print(message, flush=True)


def uptime() -> str:
    with open("/proc/loadavg") as fh:
        one, five, fifteen = fh.read().split()[:3]
    return f"load average {one}, {five}, {fifteen} (1/5/15 min) at {time.strftime('%H:%M:%S')}"


def addition_rows(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        lines.append(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}))
    return ("\n".join(lines) + "\n").encode()


def ts(value: datetime | None) -> float:
    """A stored (UTC) timestamp as epoch seconds; naive values are taken as UTC."""
    if value is None:
        return float("nan")
    if value.tzinfo is None:
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --------------------------------------------------------------------------- CPU accounting


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def proc_cpu(pid: int) -> float:
    """utime + stime of one process (all threads), seconds; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _ticks()
    except (OSError, IndexError, ValueError):
        return 0.0


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn --workers N forks its workers)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
    return out


def pids_named(comm: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as fh:
                if fh.read().strip() == comm:
                    found.append(int(entry))
    return found


def machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _ticks()


@dataclass
class CpuSample:
    at: float
    groups: dict[str, float]


class CpuMeter:
    """CPU seconds per group: this client, the API (tree), the worker, Postgres (all its
    processes on the machine), Redis, and the whole machine (which includes others' work)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def sample(self) -> CpuSample:
        groups = {"client": time.process_time()}
        for name in ("api", "worker"):
            proc = self.stack.procs.get(name)
            groups[name] = sum(proc_cpu(p) for p in tree(proc.pid)) if proc else 0.0
        groups["postgres"] = sum(proc_cpu(p) for p in pids_named("postgres"))
        groups["redis"] = sum(proc_cpu(p) for p in pids_named("redis-server"))
        groups["machine"] = machine_busy()
        return CpuSample(time.monotonic(), groups)

    @staticmethod
    def delta(a: CpuSample, b: CpuSample) -> dict[str, float]:
        out = {k: max(0.0, b.groups[k] - a.groups[k]) for k in a.groups}
        known = sum(v for k, v in out.items() if k != "machine")
        out["other"] = max(0.0, out["machine"] - known)
        out["wall"] = b.at - a.at
        return out


def cpu_line(cpu: dict[str, float]) -> str:
    wall = cpu["wall"] or 1.0
    parts = [
        f"{k} {cpu[k]:.1f}s" for k in ("client", "api", "worker", "postgres", "redis", "other")
    ]
    return (
        f"CPU over {wall:.1f}s: "
        + ", ".join(parts)
        + f"; machine busy {cpu['machine'] / wall * 100:.0f}% of 1 core x {os.cpu_count()}"
    )


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    return services.free_port()


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_MOTO_MAIN = """
import sys, threading
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
threading.Event().wait()
"""


@dataclass
class Stack:
    work: Path
    env: dict[str, str]
    settings: Settings
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    url: str = ""
    api_workers: int = 0

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        if name in self.procs:
            self.stop(name)
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n=== {shlex.join(args)}\n".encode())
            out.flush()
            self.procs[name] = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env or self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[name] = log

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process(proc, timeout_s=60 if name == "worker" else 20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(name)

    def check_alive(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise BenchError(f"{name} is not running:\n{log_tail(self.logs[name])}")

    def start_api(self, workers: int) -> None:
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.spawn("api", args)
        self.url, self.api_workers = f"http://127.0.0.1:{port}", workers
        deadline = time.monotonic() + 90
        while True:
            self.check_alive("api")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError("the API did not start:\n" + log_tail(self.logs["api"]))
            time.sleep(0.2)
        if workers > 1:  # every worker process answering, not only the first one up
            deadline = time.monotonic() + 60
            while len(tree(self.procs["api"].pid)) < workers + 1:
                if time.monotonic() > deadline:
                    raise BenchError("API workers did not start:\n" + log_tail(self.logs["api"]))
                time.sleep(0.2)
            time.sleep(2.0)

    def start_worker(self) -> None:
        self.spawn("worker", [sys.executable, "-m", "worker.main", "worker"])
        deadline = time.monotonic() + 180
        while " ready." not in self.logs["worker"].read_text(errors="replace"):
            self.check_alive("worker")
            if time.monotonic() > deadline:
                raise BenchError("the worker did not start:\n" + log_tail(self.logs["worker"]))
            time.sleep(0.2)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", httpx.Timeout(60.0))
        return httpx.AsyncClient(base_url=self.url, **kwargs)

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def new_tenant(self, name: str, **limits: int) -> dict[str, str]:
        with httpx.Client(base_url=self.url, headers=self.admin(), timeout=60) as c:
            resp = c.post("/admin/tenants", json={"name": name, **limits})
            if resp.status_code != 201:
                raise BenchError(f"POST /admin/tenants: {resp.status_code} {resp.text}")
            resp = c.post(f"/admin/tenants/{resp.json()['id']}/keys")
            if resp.status_code != 201:
                raise BenchError(f"POST /admin/tenants/…/keys: {resp.status_code} {resp.text}")
        return {"Authorization": f"Bearer {resp.json()['key']}"}

    def upload(self, headers: dict[str, str], body: bytes) -> str:
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as c:
            resp = c.post(
                "/v1/files", files={"file": ("train.jsonl", body)}, data={"purpose": "fine-tune"}
            )
        if resp.status_code != 200:
            raise BenchError(f"POST /v1/files: {resp.status_code} {resp.text}")
        file_id: str = resp.json()["id"]
        return file_id


def job_body(file_id: str, **qlora: Any) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "training_file": file_id,
        "suffix": "bench",
        "qlora": {**QUEUE_SPEC, **qlora},
    }


@contextlib.contextmanager
def service_stack(work: Path, redis_db: int) -> Iterator[Stack]:
    """Postgres database, Redis db, moto, migrations, tiny-llama, beat; the API is started by
    the caller (`Stack.start_api`). Everything is torn down on exit, whatever the exit."""
    redis_base = services.REDIS_URL.rsplit("/", 1)[0]
    redis_url = f"{redis_base}/{redis_db}"
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    base_env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV}
    moto_port = free_port()
    moto_log = work / "logs" / "moto.log"
    moto_log.parent.mkdir(parents=True, exist_ok=True)
    with moto_log.open("ab") as out:
        moto = subprocess.Popen(
            [sys.executable, "-c", _MOTO_MAIN, str(moto_port)],
            cwd=ROOT,
            env=base_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack: Stack | None = None
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{endpoint}/moto-api/", timeout=2)
                break
            if moto.poll() is not None or time.monotonic() > deadline:
                raise BenchError("moto did not start:\n" + log_tail(moto_log))
            time.sleep(0.2)
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_KEY,
            region_name="us-east-1",
        ).create_bucket(Bucket=bucket)
        model_dir = work / "models" / "tiny-llama"
        built = subprocess.run(
            [sys.executable, "-m", "worker.training.tiny", "--out", str(model_dir)],
            cwd=ROOT,
            env=base_env,
            capture_output=True,
            check=False,
        )
        if built.returncode != 0:
            raise BenchError(f"building tiny-llama failed:\n{built.stderr.decode()[-3000:]}")
        with services.temporary_postgres_database() as db_url:
            env = {
                **base_env,
                "ENVIRONMENT": "development",
                "VAR_DIR": str(work / "var"),
                "DATABASE_URL": db_url,
                "BROKER_URL": redis_url,
                "REDIS_URL": redis_url,
                "STORAGE_URL": f"s3://{bucket}",
                "S3_ENDPOINT_URL": endpoint,
                "S3_ACCESS_KEY_ID": S3_KEY,
                "S3_SECRET_ACCESS_KEY": S3_KEY,
                "ADMIN_API_KEY": ADMIN_KEY,
                "SIGNING_SECRET": SIGNING_SECRET,
                "WORKER_QUEUES": "cpu",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1",
            }
            settings = Settings(
                **{
                    k.lower(): v
                    for k, v in env.items()  # type: ignore[arg-type]
                    if k.lower() in Settings.model_fields
                }
            )
            migrate(settings)
            with session_scope(settings) as session:
                tenancy.register_model(
                    session,
                    name="tiny-llama",
                    source=str(model_dir),
                )
            configure_publisher(redis_url)
            stack = Stack(work=work, env=env, settings=settings)
            try:
                stack.spawn("beat", [sys.executable, "-m", "worker.main", "beat"])
                yield stack
            finally:
                stack.stop_all()
                configure_publisher(None)
                from shared.db import _engine_for

                _engine_for(db_url).dispose()
    finally:
        stop_process(moto)
        with contextlib.suppress(Exception):
            redis.Redis.from_url(redis_url).flushdb()


# --------------------------------------------------------------------------- SSE client


SseEvent = tuple[int | None, str, dict[str, Any]]


def parse_sse_block(block: str) -> SseEvent | None:
    """One SSE event (the text between blank lines); None for a comment (keepalive)."""
    seq: int | None = None
    kind, data = "message", None
    for line in block.split("\n"):
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
    return None if data is None else (seq, kind, data)


async def sse_events(resp: httpx.Response) -> AsyncIterator[SseEvent]:
    """(seq, event type, parsed data) per SSE event of an httpx stream; comments skipped."""
    lines: list[str] = []
    async for line in resp.aiter_lines():
        if line:
            lines.append(line)
            continue
        event = parse_sse_block("\n".join(lines))
        lines = []
        if event is not None:
            yield event


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection, one request at
    a time. It costs the client a fraction of httpx.AsyncClient's CPU per request, which
    matters when the client shares 2 cores with the server it measures (`--http-client`)."""

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    async def _head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in raw[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        return int(raw[0].split(" ", 2)[1]), headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body of a chunked response, chunk by chunk."""
        assert self.reader is not None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        try:
            await self._send(method, path, headers or {}, body)
            status, head = await self._head()
            assert self.reader is not None
            if "content-length" in head:
                payload = await self.reader.readexactly(int(head["content-length"]))
            elif head.get("transfer-encoding") == "chunked":
                payload = b"".join([c async for c in self.chunks()])
            else:
                payload = await self.reader.read()
                await self.close()
            if head.get("connection") == "close":
                await self.close()
            return status, payload
        except BaseException:
            await self.close()
            raise

    async def events(self, path: str, headers: dict[str, str]) -> AsyncIterator[SseEvent]:
        """GET an SSE stream on this connection; yields events until the server ends it."""
        try:
            await self._send("GET", path, sse_headers(headers), b"")
            status, head = await self._head()
            if status != 200 or head.get("transfer-encoding") != "chunked":
                raise BenchError(f"SSE GET {path}: HTTP {status} {head}")
            buf = ""
            async for chunk in self.chunks():
                buf += chunk.decode()
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    event = parse_sse_block(block)
                    if event is not None:
                        yield event
        finally:
            await self.close()

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def sse_headers(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Accept": "text/event-stream"}


# --------------------------------------------------------------------------- jobs with a worker


@dataclass
class JobRun:
    job_id: str
    t_submit: float  # client, epoch seconds, before the POST
    t_response: float  # POST answered
    t_running: float  # client saw `running`
    t_final: float  # client saw the final state
    status: str
    job: dict[str, Any] = field(default_factory=dict)


async def run_and_watch(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any], detect: str
) -> JobRun:
    """Submit a job, then follow it until it is final: SSE events or 20 ms polling."""
    t_submit = time.time()
    resp = await client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    t_response = time.time()
    if resp.status_code != 200:
        raise BenchError(f"POST /v1/fine_tuning/jobs: {resp.status_code} {resp.text}")
    job_id = resp.json()["id"]
    t_running = t_final = float("nan")
    status = "unknown"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    if detect == "sse":
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        async with asyncio.timeout(JOB_TIMEOUT_S):
            async with client.stream("GET", url, headers=sse_headers(headers)) as stream:
                async for _seq, kind, data in sse_events(stream):
                    now = time.time()
                    if kind == "done":
                        status = data.get("status") or status
                        break
                    state = (data.get("data") or {}).get("status")
                    if state == "running" and t_running != t_running:
                        t_running = now
                    if state in TERMINAL:
                        t_final, status = now, state
    else:
        while True:
            got = (await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
            now = time.time()
            if got["status"] != "queued" and t_running != t_running:
                t_running = now  # `running`, or already final: the first sight of either
            if got["status"] in TERMINAL:
                t_final, status = now, got["status"]
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{job_id} did not finish in {JOB_TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_INTERVAL_S)
    job = (await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
    return JobRun(job_id, t_submit, t_response, t_running, t_final, status, job)


def stored_events(settings: Settings, job_id: str) -> list[tuple[float, dict[str, Any]]]:
    """(epoch seconds, data) of a job's events, oldest first; timestamps at full resolution."""
    with session_scope(settings) as session:
        rows = session.execute(
            select(JobEvent.created_at, JobEvent.data)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.seq)
        ).all()
    return [(ts(r.created_at), r.data or {}) for r in rows]


def first_status(events: list[tuple[float, dict[str, Any]]], status: str) -> float:
    return next((t for t, d in events if d.get("status") == status), float("nan"))


def job_times(settings: Settings, job_id: str) -> tuple[float, float, float]:
    """(created_at, started_at, finished_at) of a job as stored, epoch seconds."""
    with session_scope(settings) as session:
        row = session.get(Job, job_id)
        assert row is not None
        return ts(row.created_at), ts(row.started_at), ts(row.finished_at)


async def worker_free_at(stack: Stack, job_id: str, timeout_s: float = 120.0) -> float:
    """When the worker's task for `job_id` returned (its log line `qlora.run_job(...) -> ...`),
    i.e. when the solo-pool worker could take the next message; epoch seconds (ms resolution)."""
    needle = f"qlora.run_job('{job_id}',) -> "
    deadline = time.monotonic() + timeout_s
    while True:
        for line in stack.logs["worker"].read_text(errors="replace").splitlines():
            if needle in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # local time
                return stamp.timestamp()
        if time.monotonic() > deadline:
            raise BenchError(
                f"the worker did not finish {job_id}:\n{log_tail(stack.logs['worker'])}"
            )
        await asyncio.sleep(0.05)


@dataclass
class QueueResult:
    client_submit_to_running: list[float] = field(default_factory=list)
    post: list[float] = field(default_factory=list)
    response_to_running: list[float] = field(default_factory=list)
    server_queued_to_running: list[float] = field(default_factory=list)
    worker_tail: list[float] = field(default_factory=list)  # succeeded committed -> worker free
    b2b_client: list[float] = field(default_factory=list)  # back to back: no wait for the worker
    b2b_server: list[float] = field(default_factory=list)
    cold: JobRun | None = None
    cold_server: float = float("nan")
    last_job: str | None = None


async def bench_queue(
    stack: Stack, headers: dict[str, str], file_id: str, n: int, b2b: int, detect: str
) -> QueueResult:
    """n jobs each submitted once the worker is idle (after a warm-up job), then `b2b` jobs each
    submitted as soon as the previous one was seen `succeeded`."""
    res = QueueResult()
    async with stack.client() as client:
        for i in range(n + 1 + b2b):
            idle = i <= n
            run = await run_and_watch(client, headers, job_body(file_id), detect)
            if run.status != "succeeded":
                raise BenchError(f"queue job {run.job_id} ended {run.status}: {run.job}")
            res.last_job = run.job_id
            events = stored_events(stack.settings, run.job_id)
            server = first_status(events, "running") - first_status(events, "queued")
            label = (
                "warm-up (not counted)" if i == 0 else f"{i}/{n}" if idle else f"b2b {i - n}/{b2b}"
            )
            say(
                f"  job {label}: submit->running {ms(run.t_running - run.t_submit)} ms "
                f"(server {ms(server)} ms), whole job {run.t_final - run.t_submit:.2f}s"
            )
            if i == 0:
                res.cold, res.cold_server = run, server
            elif idle:
                res.client_submit_to_running.append(run.t_running - run.t_submit)
                res.post.append(run.t_response - run.t_submit)
                res.response_to_running.append(run.t_running - run.t_response)
                res.server_queued_to_running.append(server)
            else:
                res.b2b_client.append(run.t_running - run.t_submit)
                res.b2b_server.append(server)
            if i < n:  # the next job is an idle-worker one: wait until the worker is free
                free = await worker_free_at(stack, run.job_id)
                res.worker_tail.append(free - job_times(stack.settings, run.job_id)[2])
                await asyncio.sleep(IDLE_GAP_S)
    return res


@dataclass
class OverheadRun:
    wall: float  # client: before the POST -> saw `succeeded`
    post: float
    queue_wait: float  # server: job created -> claimed
    prep: float  # claimed -> engine start (downloads, model lookup)
    engine: float  # metrics["wall_seconds"]: the whole train()
    engine_setup: float  # engine - step loop: model load, tokenizing, eval before
    steps: float  # the step loop (from the last step's tokens/s)
    finalize: float  # last step -> finished_at: adapter files, S3 upload, DB
    notify: float  # finished_at -> client saw it
    step_count: int
    job_id: str


async def bench_overhead(
    stack: Stack,
    headers: dict[str, str],
    file_id: str,
    steps: int,
    repeats: int,
    detect: str,
    previous: str | None,
) -> list[OverheadRun]:
    """`repeats` jobs of `steps` steps, each submitted once the worker is free; `previous` is
    the last job this worker ran (None: it is idle)."""
    runs = []
    async with stack.client() as client:
        for i in range(repeats):
            if previous:  # measure from an idle worker, as a queue with one job would see it
                await worker_free_at(stack, previous)
                await asyncio.sleep(IDLE_GAP_S)
            run = await run_and_watch(client, headers, job_body(file_id, max_steps=steps), detect)
            previous = run.job_id
            if run.status != "succeeded":
                raise BenchError(f"overhead job {run.job_id} ended {run.status}: {run.job}")
            adapter = (
                await client.get(f"/v1/adapters/{run.job['adapter_id']}", headers=headers)
            ).json()
            metrics = adapter["metrics"]
            created, started, finished = job_times(stack.settings, run.job_id)
            events = stored_events(stack.settings, run.job_id)
            last = [(t, d) for t, d in events if d.get("step") == steps and "loss" in d]
            if not last:
                raise BenchError(f"no final step event for {run.job_id}")
            t_last, d_last = last[-1]
            engine = float(metrics["wall_seconds"])
            loop = float(metrics["train_tokens"]) / float(d_last["tokens_per_second"])
            engine_start = t_last - engine
            o = OverheadRun(
                wall=run.t_final - run.t_submit,
                post=run.t_response - run.t_submit,
                queue_wait=started - created,
                prep=engine_start - started,
                engine=engine,
                engine_setup=engine - loop,
                steps=loop,
                finalize=finished - t_last,
                notify=run.t_final - finished,
                step_count=int(metrics["steps"]),
                job_id=run.job_id,
            )
            runs.append(o)
            say(
                f"  run {i + 1}/{repeats}: wall {o.wall:.2f}s, engine {o.engine:.2f}s, "
                f"steps {o.steps:.2f}s -> overhead {(o.wall - o.engine) / o.wall * 100:.1f}% "
                f"of wall vs engine, {(o.wall - o.steps) / o.wall * 100:.1f}% vs step loop"
            )
    return runs


# --------------------------------------------------------------------------- SSE fan-out


@dataclass
class Watcher:
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    latency: dict[int, float] = field(default_factory=dict)  # bench index -> arrival - data.t
    dupes: int = 0
    out_of_order: int = 0
    last_seq: int = 0
    done: str | None = None
    error: str | None = None


async def consume(events: AsyncIterator[SseEvent], w: Watcher) -> None:
    async for seq, kind, data in events:
        now = time.time()
        if kind == "done":
            w.done = str(data.get("status"))
            return
        w.connected.set()
        if seq is not None:
            if seq <= w.last_seq:
                w.out_of_order += 1
            w.last_seq = seq
        payload = data.get("data") or {}
        if "bench" in payload:
            index = int(payload["bench"])
            if index in w.latency:
                w.dupes += 1
            else:
                w.latency[index] = now - float(payload["t"])


async def watch(
    client: httpx.AsyncClient | None, base_url: str, path: str, headers: dict[str, str], w: Watcher
) -> None:
    """One watcher: over the shared httpx client, or (client None) its own raw connection."""
    try:
        if client is None:
            await consume(RawHttp(base_url).events(path, headers), w)
            return
        async with client.stream("GET", path, headers=sse_headers(headers)) as resp:
            if resp.status_code != 200:
                w.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            await consume(sse_events(resp), w)
    except Exception as exc:  # reported per watcher; the run continues
        w.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        w.connected.set()  # a failed watcher must not hold up the others


def generate_events(
    settings: Settings, job_id: str, count: int, rate: float, writes: list[float]
) -> None:
    """`count` events at `rate`/s on a fixed schedule, each in its own transaction (committing
    publishes the Redis nudge); `writes` gets each insert+commit+publish time."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.time()
        with session_scope(settings) as session:
            job = session.get(Job, job_id)
            assert job is not None
            record_event(session, job, f"bench event {i}", data={"t": t, "bench": i})
        writes.append(time.time() - t)


@dataclass
class SseResult:
    watchers: int
    events: int
    connect_s: float
    latencies: list[float]
    per_watcher_p99: list[float]
    received_min: int
    received_max: int
    missing: int
    dupes: int
    out_of_order: int
    errors: list[str]
    done: Counter[str]
    drain_s: float
    writes: list[float]
    cpu: dict[str, float]


async def bench_sse_once(
    stack: Stack,
    headers: dict[str, str],
    file_id: str,
    watchers: int,
    rate: float,
    seconds: float,
    raw: bool,
) -> SseResult:
    count = round(rate * seconds)
    meter = CpuMeter(stack)
    limits = httpx.Limits(max_connections=watchers + 10, max_keepalive_connections=watchers + 10)
    timeout = httpx.Timeout(30.0, read=60.0)
    async with stack.client(limits=limits, timeout=timeout) as client:
        resp = await client.post("/v1/fine_tuning/jobs", json=job_body(file_id), headers=headers)
        if resp.status_code != 200:
            raise BenchError(f"POST /v1/fine_tuning/jobs: {resp.status_code} {resp.text}")
        job_id = resp.json()["id"]
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        ws = [Watcher() for _ in range(watchers)]
        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(watch(None if raw else client, stack.url, url, headers, w))
            for w in ws
        ]
        try:
            async with asyncio.timeout(120):
                await asyncio.gather(*(w.connected.wait() for w in ws))
        except TimeoutError:
            say("  not every watcher connected within 120 s; measuring those that did")
        connect_s = time.monotonic() - t0
        await asyncio.sleep(0.5)  # let the streams settle into their pub/sub wait
        writes: list[float] = []
        before = meter.sample()
        await asyncio.to_thread(generate_events, stack.settings, job_id, count, rate, writes)
        t_sent = time.monotonic()
        # Wait until every watcher has every event, or nothing new arrived for DRAIN_IDLE_S.
        delivered, progress_at = -1, time.monotonic()
        while time.monotonic() - t_sent < DRAIN_MAX_S and any(
            len(w.latency) < count and w.error is None and w.done is None for w in ws
        ):
            now_delivered = sum(len(w.latency) for w in ws)
            if now_delivered != delivered:
                delivered, progress_at = now_delivered, time.monotonic()
            elif time.monotonic() - progress_at > DRAIN_IDLE_S:
                break
            await asyncio.sleep(0.02)
        drain_s = time.monotonic() - t_sent
        after = meter.sample()
        cancel = await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers)
        if cancel.status_code != 200:
            raise BenchError(f"cancel: {cancel.status_code} {cancel.text}")
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [lat for w in ws for lat in w.latency.values()]
    received = [len(w.latency) for w in ws]
    return SseResult(
        watchers=watchers,
        events=count,
        connect_s=connect_s,
        latencies=latencies,
        per_watcher_p99=[pct(list(w.latency.values()), 99) for w in ws if w.latency],
        received_min=min(received),
        received_max=max(received),
        missing=sum(count - r for r in received),
        dupes=sum(w.dupes for w in ws),
        out_of_order=sum(w.out_of_order for w in ws),
        errors=[w.error for w in ws if w.error],
        done=Counter(str(w.done) for w in ws),
        drain_s=drain_s,
        writes=writes,
        cpu=CpuMeter.delta(before, after),
    )


# --------------------------------------------------------------------------- submit load


@dataclass
class LoadResult:
    name: str
    latencies: list[float]
    starts: list[float]  # seconds into the window, per latency
    statuses: Counter[str]
    completed: int
    duration: float
    cpu: dict[str, float]

    @property
    def rps(self) -> float:
        return self.completed / self.duration


@dataclass
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


async def closed_loop(
    stack: Stack, name: str, req: Req, concurrency: int, warmup: float, duration: float, raw: bool
) -> LoadResult:
    """`concurrency` clients, each on its own keep-alive connection, sending its next request as
    soon as the last is answered. Latencies of 200s started in the window; throughput = 200s
    answered inside the window."""
    meter = CpuMeter(stack)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    starts: list[float] = []
    statuses: Counter[str] = Counter()
    completed = 0
    samples: list[CpuSample] = []
    begin = time.perf_counter()
    start, end = begin + warmup, begin + warmup + duration
    headers = {**req.headers, "Content-Type": "application/json"} if req.body else req.headers

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal completed
        conn = RawHttp(stack.url) if raw else None
        try:
            while (t0 := time.perf_counter()) < end:
                try:
                    if conn is not None:
                        code, _ = await conn.request(req.method, req.path, headers, req.body)
                    else:
                        resp = await client.request(
                            req.method, req.path, headers=headers, content=req.body or None
                        )
                        code = resp.status_code
                    status = str(code)
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError) as exc:
                    status = type(exc).__name__
                t1 = time.perf_counter()
                if t0 >= start:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(t1 - t0)
                        starts.append(t0 - start)
                if start <= t1 < end and status == "200":
                    completed += 1
        finally:
            if conn is not None:
                await conn.close()

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        samples.append(meter.sample())
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        samples.append(meter.sample())

    async with stack.client(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        await asyncio.gather(sampler(), *(one_client(client) for _ in range(concurrency)))
    return LoadResult(
        name,
        latencies,
        starts,
        statuses,
        completed,
        duration,
        CpuMeter.delta(samples[0], samples[1]),
    )


def count_jobs(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(text("SELECT count(*) FROM jobs")) or 0)


async def bench_submit(
    stack: Stack,
    headers: dict[str, str],
    file_id: str,
    concurrency: int,
    warmup: float,
    duration: float,
    raw: bool,
) -> list[LoadResult]:
    body = job_body(file_id)
    async with stack.client() as c:
        probe = await c.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    if probe.status_code != 200:
        raise BenchError(f"POST /v1/fine_tuning/jobs: {probe.status_code} {probe.text}")
    job_path = f"/v1/fine_tuning/jobs/{probe.json()['id']}"

    payload = json.dumps(body).encode()
    results = []
    plan = [
        ("GET /healthz", Req("GET", "/healthz", {}), raw),
        ("GET /v1/fine_tuning/jobs/{id}", Req("GET", job_path, headers), raw),
        ("POST /v1/fine_tuning/jobs", Req("POST", "/v1/fine_tuning/jobs", headers, payload), raw),
    ]
    if raw:  # the same bare endpoint through httpx: what the client itself costs
        plan.append(("GET /healthz, httpx.AsyncClient", Req("GET", "/healthz", {}), False))
    for name, req, raw_client in plan:
        jobs_before = count_jobs(stack.settings)
        result = await closed_loop(stack, name, req, concurrency, warmup, duration, raw_client)
        results.append(result)
        extra = ""
        if name.startswith("POST"):
            extra = f"; jobs in table {jobs_before} -> {count_jobs(stack.settings)}"
        say(
            f"  {name}: {result.rps:.0f} req/s, p50 {ms(pct(result.latencies, 50))} ms, "
            f"p99 {ms(pct(result.latencies, 99))} ms, statuses {dict(result.statuses)}{extra}"
        )
        say(f"    {cpu_line(result.cpu)}")
        await asyncio.sleep(1.0)
    return results


def submit_breakdown(
    settings: Settings, headers: dict[str, str], file_id: str, n: int
) -> list[str]:
    """Where one POST's server time goes: the route's own functions called in this process, one
    request at a time (no HTTP, no concurrency: a lower bound of the API's CPU per request),
    each phase timed by wrapping it, and the SQL it sends counted on the engine."""
    from sqlalchemy import event
    from starlette.requests import Request

    from api.app import create_app
    from api.deps import get_current_tenant
    from api.routes import jobs as routes
    from shared.db import get_engine
    from shared.jobs import service as job_service
    from shared.jobs.schemas import JobCreate

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    app = create_app(settings)  # it calls logging.basicConfig(INFO): keep this process quiet
    root.setLevel(level)
    root.handlers[:] = handlers
    auth = headers["Authorization"].encode()
    scope = {
        "type": "http",
        "app": app,
        "method": "POST",
        "path": "/v1/fine_tuning/jobs",
        "headers": [(b"authorization", auth)],
    }
    request = Request(scope)
    body = JobCreate(**job_body(file_id))
    engine = get_engine(settings)
    spent: dict[str, float] = defaultdict(float)
    counts: Counter[str] = Counter()

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t0

        return wrapper

    def on_statement(*_: Any) -> None:
        counts["statements"] += 1

    def on_commit(*_: Any) -> None:
        counts["commits"] += 1

    original_create, original_relay = job_service.create_job, routes.relay_outbox
    original_ping = engine.dialect.do_ping
    original_send = app.state.publish_job.app.send_task

    def ping(conn: Any) -> bool:
        counts["pings"] += 1
        return bool(original_ping(conn))

    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    setattr(job_service, "create_job", timed("admission", original_create))  # noqa: B010
    setattr(routes, "relay_outbox", timed("relay", original_relay))  # noqa: B010
    app.state.publish_job.app.send_task = timed("publish", original_send)
    setattr(engine.dialect, "do_ping", ping)  # noqa: B010
    try:
        for i in range(n + 20):  # 20 warm-up requests
            if i == 20:
                spent.clear()
                counts.clear()
            t0 = time.perf_counter()
            tenant = timed("auth", get_current_tenant)(request)
            t1 = time.perf_counter()
            obj = routes.create_job(request, body, tenant, None)
            t2 = time.perf_counter()
            obj.model_dump_json()
            spent["route"] += t2 - t1
            spent["serialize"] += time.perf_counter() - t2
            spent["total"] += time.perf_counter() - t0
    finally:
        setattr(job_service, "create_job", original_create)  # noqa: B010
        setattr(routes, "relay_outbox", original_relay)  # noqa: B010
        app.state.publish_job.app.send_task = original_send
        setattr(engine.dialect, "do_ping", original_ping)  # noqa: B010
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    per = {k: v / n * 1000 for k, v in spent.items()}
    rows = [
        ["auth (key lookup, tenant, last_used_at; own transaction)", f"{per['auth']:.2f}"],
        [
            "admission (model, file, spec, estimate, queued count, inserts)",
            f"{per['admission']:.2f}",
        ],
        [
            "commit of the job transaction, JobObject",
            f"{per['route'] - per['admission'] - per['relay']:.2f}",
        ],
        ["outbox relay (own transaction)", f"{per['relay']:.2f}"],
        ["  of which Celery send_task to Redis", f"{per['publish']:.2f}"],
        ["response serialization", f"{per['serialize']:.2f}"],
        ["total", f"{per['total']:.2f}"],
    ]
    return [
        f"Where a POST's server time goes ({n} requests in-process, sequential, no HTTP layer; "
        f"this machine, {uptime()}):",
        "",
        table(["phase", "ms per POST"], rows),
        "",
        f"Per POST: {counts['statements'] / n:.1f} SQL statements, {counts['pings'] / n:.1f} "
        f"pool pre-ping round trips, {counts['commits'] / n:.1f} commits.",
    ]


# --------------------------------------------------------------------------- reporting


def report_submit(
    workers: int, results: list[LoadResult], concurrency: int, client: str
) -> list[str]:
    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r.name,
                f"{r.rps:.0f}",
                ms(pct(r.latencies, 50)),
                ms(pct(r.latencies, 99)),
                f"{r.rps / base.rps:.3f}" if base.rps else "-",
                f"{pct(r.latencies, 50) / pct(base.latencies, 50):.1f}x",
                f"{r.cpu['api'] / max(r.completed, 1) * 1000:.2f}",
                f"{r.cpu['postgres'] / max(r.completed, 1) * 1000:.2f}",
                f"{r.cpu['client'] / max(r.completed, 1) * 1000:.2f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items())),
            ]
        )
    out = [
        f"Submit: {concurrency} concurrent clients ({client} client unless named; one keep-alive "
        f"connection each), API `--workers {workers}`, {results[0].duration:.0f} s window per "
        "endpoint after a warm-up; jobs stay queued (no worker). CPU ms/req = CPU seconds of "
        "that process group in the window / requests answered (Postgres: all its processes).",
        "",
        table(
            [
                "endpoint",
                "req/s",
                "p50 ms",
                "p99 ms",
                "req/s vs healthz",
                "p50 vs healthz",
                "API CPU ms/req",
                "PG CPU ms/req",
                "client CPU ms/req",
                "statuses",
            ],
            rows,
        ),
    ]
    post = results[2]
    quarter = post.duration / 4
    first = [lat for lat, s in zip(post.latencies, post.starts, strict=True) if s < quarter]
    last = [lat for lat, s in zip(post.latencies, post.starts, strict=True) if s >= 3 * quarter]
    out += [
        "",
        f"POST p50 in the window's first quarter {ms(pct(first, 50))} ms, last quarter "
        f"{ms(pct(last, 50))} ms (queued jobs pile up during the run)",
    ]
    for r in results:
        out.append(f"- {r.name}: {cpu_line(r.cpu)}")
    return out


def report_queue(res: QueueResult, detect: str) -> list[str]:
    rows = []
    for label, values in (
        ("client: submit -> running seen", res.client_submit_to_running),
        ("  of which POST round trip", res.post),
        ("  of which POST answered -> running seen", res.response_to_running),
        ("server: queued event -> running event", res.server_queued_to_running),
        ("worker busy after its job committed succeeded", res.worker_tail),
        ("back to back: client submit -> running seen", res.b2b_client),
        ("back to back: server queued -> running", res.b2b_server),
    ):
        if not values:
            continue
        rows.append(
            [
                label,
                len(values),
                ms(pct(values, 50)),
                ms(pct(values, 99)),
                ms(max(values) if values else float("nan")),
            ]
        )
    how = "the job's SSE stream" if detect == "sse" else "polling GET /jobs/{id} every 20 ms"
    out = [
        f"Queue latency ({how}): one job at a time, each waited on until it succeeded; "
        "the next one submitted once the worker's task had returned (from its log) + "
        f"{IDLE_GAP_S:g} s, or for the back-to-back rows as soon as `succeeded` was seen. "
        "Server rows: the stored events' full-resolution timestamps.",
        "",
        table(["measure", "n", "p50 ms", "p99 ms", "max ms"], rows),
    ]
    if res.cold is not None:
        out += [
            "",
            f"First job on a fresh worker (warm-up, not counted): submit->running "
            f"{ms(res.cold.t_running - res.cold.t_submit)} ms (server "
            f"{ms(res.cold_server)} ms)",
        ]
    return out


def report_overhead(runs: list[OverheadRun], steps: int) -> list[str]:
    def med(name: str) -> float:
        return float(statistics.median(float(getattr(r, name)) for r in runs))

    wall = med("wall")
    rows = []
    for name, what in (
        ("post", "client: POST round trip"),
        ("queue_wait", "queue wait (created -> claimed)"),
        ("prep", "worker prep (claimed -> engine start: file download, model row)"),
        ("engine_setup", "engine setup (model load, tokenize, eval) = engine - step loop"),
        ("steps", "engine step loop (incl. in-loop progress writes)"),
        ("finalize", "finalize (last step -> succeeded: outputs, S3 upload, DB)"),
        ("notify", "notify (succeeded committed -> client saw it)"),
    ):
        rows.append([what, f"{med(name):.3f}", f"{med(name) / wall * 100:.1f}%"])
    rows.append(["job wall time (client submit -> succeeded seen)", f"{wall:.3f}", "100%"])
    over_engine = [(r.wall - r.engine) / r.wall for r in runs]
    over_steps = [(r.wall - r.steps) / r.wall for r in runs]
    return [
        f"Service overhead: {len(runs)} jobs of {steps} steps (median of each row; rows are "
        "medians, so they need not add up exactly):",
        "",
        table(["phase", "seconds", "of wall"], rows),
        "",
        table(
            ["overhead", "runs", "median", "target"],
            [
                [
                    "(wall - engine train() time) / wall",
                    ", ".join(f"{x * 100:.1f}%" for x in over_engine),
                    f"{statistics.median(over_engine) * 100:.1f}%",
                    f"< {OVERHEAD_TARGET * 100:.0f}%",
                ],
                [
                    "(wall - step loop time) / wall",
                    ", ".join(f"{x * 100:.1f}%" for x in over_steps),
                    f"{statistics.median(over_steps) * 100:.1f}%",
                    "(for reference)",
                ],
            ],
        ),
    ]


def report_sse(workers: int, results: list[SseResult], rate: float) -> list[str]:
    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r.watchers,
                r.events,
                f"{r.connect_s:.2f}",
                ms(pct(r.latencies, 50)),
                ms(pct(r.latencies, 99)),
                ms(max(r.latencies) if r.latencies else float("nan")),
                f"{pct(r.latencies, 50) / pct(base.latencies, 50):.1f}x",
                f"{pct(r.latencies, 99) / pct(base.latencies, 99):.1f}x",
                f"{r.received_min}-{r.received_max}",
                r.missing,
                r.dupes,
                r.out_of_order,
                len(r.errors),
                f"{r.drain_s:.2f}",
            ]
        )
    out = [
        f"SSE fan-out: API `--workers {workers}`, {base.events} events at {rate:g}/s written by "
        "the benchmark (latency = arrival at the watcher - time.time() just before the insert):",
        "",
        table(
            [
                "watchers",
                "events",
                "connect s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "p50 vs 1",
                "p99 vs 1",
                "received/watcher",
                "missing",
                "dupes",
                "out of order",
                "errors",
                "drain s",
            ],
            rows,
        ),
        "",
    ]
    for r in results:
        out.append(
            f"- {r.watchers} watcher(s): API CPU "
            f"{r.cpu['api'] / max(len(r.latencies), 1) * 1000:.2f} ms per delivered event; "
            f"insert+commit+publish p50 {ms(pct(r.writes, 50))}"
            f" ms, p99 {ms(pct(r.writes, 99))} ms; worst watcher's p99 "
            f"{ms(max(r.per_watcher_p99) if r.per_watcher_p99 else float('nan'))} ms; "
            f"stream ends {dict(r.done)}; {cpu_line(r.cpu)}"
        )
        for err in sorted(set(r.errors))[:5]:
            out.append(f"  error: {err}")
    return out


def machine_notes(settings: Settings) -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as fh:
        mem_kib = int(fh.readline().split()[1])
    gpu = "no GPU" if shutil.which("nvidia-smi") is None else "nvidia-smi present"
    with session_scope(settings) as session:
        pg = str(session.scalar(text("SHOW server_version")))
    import redis

    redis_version = redis.Redis.from_url(services.REDIS_URL).info("server").get("redis_version")
    return [
        f"{os.cpu_count()} cores ({model}), {mem_kib / 2**20:.0f} GiB RAM, {gpu}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"Postgres {pg}, Redis {redis_version}, S3 = moto server over HTTP (own process)",
    ]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--only",
        default=",".join(PARTS),
        help="comma-separated parts: submit,queue,overhead,sse (default: all)",
    )
    p.add_argument(
        "--api-workers",
        default="1",
        help="uvicorn --workers for the submit and sse parts, comma-separated "
        "(e.g. 1,2); queue and overhead use the first",
    )
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each load window")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each load window")
    p.add_argument("--queue-jobs", type=int, default=15)
    p.add_argument("--queue-detect", choices=("sse", "poll"), default="sse")
    p.add_argument("--queue-b2b", type=int, default=5, help="extra jobs submitted back to back")
    p.add_argument(
        "--overhead-steps",
        default="30",
        help="max_steps of the overhead jobs; comma-separated for several sizes (e.g. 30,150)",
    )
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--watchers", type=int, default=200)
    p.add_argument("--sse-rate", type=float, default=20.0, help="events per second")
    p.add_argument("--sse-seconds", type=float, default=10.0)
    p.add_argument(
        "--http-client",
        choices=("raw", "httpx"),
        default="raw",
        help="client of the submit and sse parts: a minimal asyncio HTTP/1.1 client (default) "
        "or httpx.AsyncClient (costs the shared CPU more per request)",
    )
    p.add_argument("--redis-db", type=int, default=12, help="Redis database (flushed!)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work dir with the logs")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    args.workers = [int(w) for w in args.api_workers.split(",")]
    args.steps = [int(n) for n in args.overhead_steps.split(",")]
    if args.redis_db == 11:
        p.error("Redis db 11 belongs to the jobs tests; pick another")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    summary: list[str] = []
    report: list[str] = []
    failures: list[str] = []
    say(f"$ {shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}")
    say(f"machine: {uptime()}")
    for name, ok in (
        ("Postgres", services.postgres_available()),
        ("Redis", services.redis_available()),
    ):
        if not ok:
            raise BenchError(f"{name} is not reachable (see tests/services.py for the URLs)")
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    try:
        with service_stack(work, args.redis_db) as stack:
            notes = machine_notes(stack.settings)
            for line in notes:
                say(line)
            say(
                f"processes: uvicorn --no-access-log --log-level warning; beat; worker solo "
                f"pool, OMP_NUM_THREADS=1; service defaults otherwise (lease 60 s, progress "
                f"writes every 2 s, sweep every 10 s); Redis db {args.redis_db}"
            )
            stack.start_api(args.workers[0])
            if {"queue", "overhead"} & set(args.parts):
                headers = stack.new_tenant("bench-queue")
                file_id = stack.upload(headers, addition_rows(200, seed=1))
                say("\nstarting one worker")
                stack.start_worker()
                if "queue" in args.parts:
                    say(f"\n== queue: {args.queue_jobs} jobs ({args.queue_detect}); {uptime()}")
                    qres = asyncio.run(
                        bench_queue(
                            stack,
                            headers,
                            file_id,
                            args.queue_jobs,
                            args.queue_b2b,
                            args.queue_detect,
                        )
                    )
                    lines = report_queue(qres, args.queue_detect)
                    report += ["", *lines]
                    say("\n" + "\n".join(lines))
                    summary.append(
                        f"queue latency (submit -> running, client): p50 "
                        f"{ms(pct(qres.client_submit_to_running, 50))} ms, p99 "
                        f"{ms(pct(qres.client_submit_to_running, 99))} ms; server "
                        f"p50 {ms(pct(qres.server_queued_to_running, 50))} ms; worker busy "
                        f"{ms(pct(qres.worker_tail, 50))} ms (p50) after committing `succeeded`"
                    )
                else:  # a warm-up job, so overhead does not measure a cold worker
                    qres = asyncio.run(
                        bench_queue(stack, headers, file_id, 0, 0, args.queue_detect)
                    )
                previous = qres.last_job
                for steps in args.steps if "overhead" in args.parts else []:
                    say(f"\n== overhead: {args.overhead_repeats} x {steps} steps; {uptime()}")
                    oruns = asyncio.run(
                        bench_overhead(
                            stack,
                            headers,
                            file_id,
                            steps,
                            args.overhead_repeats,
                            args.queue_detect,
                            previous,
                        )
                    )
                    previous = oruns[-1].job_id
                    lines = report_overhead(oruns, steps)
                    report += ["", *lines]
                    say("\n" + "\n".join(lines))
                    oe = statistics.median((r.wall - r.engine) / r.wall for r in oruns)
                    os_ = statistics.median((r.wall - r.steps) / r.wall for r in oruns)
                    verdict = "meets" if oe < OVERHEAD_TARGET else "MISSES"
                    summary.append(
                        f"service overhead ({steps}-step job, median of "
                        f"{len(oruns)}): {oe * 100:.1f}% vs engine train() ({verdict} the "
                        f"{OVERHEAD_TARGET * 100:.0f}% target), {os_ * 100:.1f}% vs the step "
                        f"loop; job wall {statistics.median(r.wall for r in oruns):.2f}s, "
                        f"engine {statistics.median(r.engine for r in oruns):.2f}s"
                    )
                stack.stop("worker")
                say("worker stopped")
            for workers in args.workers:
                if not {"sse", "submit"} & set(args.parts):
                    break
                if stack.api_workers != workers:
                    stack.start_api(workers)
                if "sse" in args.parts:
                    headers = stack.new_tenant(f"bench-sse-{workers}")
                    file_id = stack.upload(headers, addition_rows(20, seed=2))
                    results = []
                    for n in (1, args.watchers):
                        say(f"\n== sse: {n} watcher(s), API --workers {workers}; {uptime()}")
                        r = asyncio.run(
                            bench_sse_once(
                                stack,
                                headers,
                                file_id,
                                n,
                                args.sse_rate,
                                args.sse_seconds,
                                args.http_client == "raw",
                            )
                        )
                        say(
                            f"  p50 {ms(pct(r.latencies, 50))} ms, p99 "
                            f"{ms(pct(r.latencies, 99))} ms, missing {r.missing}, dupes "
                            f"{r.dupes}, errors {len(r.errors)}"
                        )
                        results.append(r)
                        if r.missing or r.dupes or r.errors or r.out_of_order:
                            failures.append(
                                f"sse ({n} watchers, --workers {workers}): missing {r.missing}, "
                                f"dupes {r.dupes}, out of order {r.out_of_order}, "
                                f"errors {len(r.errors)}"
                            )
                    lines = report_sse(workers, results, args.sse_rate)
                    report += ["", *lines]
                    say("\n" + "\n".join(lines))
                    b, f = results[0], results[-1]
                    summary.append(
                        f"SSE (--workers {workers}): 1 watcher p50/p99 "
                        f"{ms(pct(b.latencies, 50))}/{ms(pct(b.latencies, 99))} ms; "
                        f"{f.watchers} watchers {ms(pct(f.latencies, 50))}/"
                        f"{ms(pct(f.latencies, 99))} ms; missing {f.missing}, dupes {f.dupes}"
                    )
                if "submit" in args.parts:
                    headers = stack.new_tenant(f"bench-submit-{workers}", max_queued_jobs=100000)
                    file_id = stack.upload(headers, addition_rows(20, seed=3))
                    say(
                        f"\n== submit: {args.concurrency} clients, API --workers {workers}; "
                        f"{uptime()}"
                    )
                    lres = asyncio.run(
                        bench_submit(
                            stack,
                            headers,
                            file_id,
                            args.concurrency,
                            args.warmup,
                            args.duration,
                            args.http_client == "raw",
                        )
                    )
                    lines = report_submit(workers, lres, args.concurrency, args.http_client)
                    report += ["", *lines]
                    say("\n" + "\n".join(lines))
                    h, post = lres[0], lres[2]
                    summary.append(
                        f"submit (--workers {workers}, {args.concurrency} clients): POST "
                        f"{post.rps:.0f} req/s p50/p99 {ms(pct(post.latencies, 50))}/"
                        f"{ms(pct(post.latencies, 99))} ms vs healthz {h.rps:.0f} req/s "
                        f"{ms(pct(h.latencies, 50))}/{ms(pct(h.latencies, 99))} ms "
                        f"(throughput ratio {post.rps / h.rps:.3f})"
                    )
                    if workers == args.workers[0]:
                        lines = submit_breakdown(stack.settings, headers, file_id, 200)
                        report += ["", *lines]
                        say("\n" + "\n".join(lines))
                    bad = {k: v for k, v in post.statuses.items() if k != "200"}
                    bad_h = {k: v for r in lres for k, v in r.statuses.items() if k != "200"}
                    if bad or bad_h:
                        failures.append(f"submit (--workers {workers}): non-200 {bad_h}")
            if "api" in stack.procs:
                stack.check_alive("api")
    finally:
        if args.keep_logs:
            say(f"\nlogs kept in {work / 'logs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    say("\n==== report")
    say("\n".join(report).strip())
    say("\n==== summary")
    say(f"$ {shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}")
    for line in summary:
        say(f"- {line}")
    for line in failures:
        say(f"- FAILED: {line}")
    say(
        f"- machine after: {uptime()}; total {time.monotonic() - started:.0f}s; numbers are "
        f"noisy: {os.cpu_count()} cores shared by client, API, Postgres, Redis, worker and "
        "whatever else runs on the machine (see the CPU lines)"
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return run(args)
    except BenchError as exc:
        say(f"\nbenchmark failed: {exc}")
        return 2
    except KeyboardInterrupt:
        say("\ninterrupted; processes stopped and the database dropped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
