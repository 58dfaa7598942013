"""Submit: ``POST /v1/fine_tuning/jobs`` under N concurrent clients against ``GET /healthz``.

Same API, same concurrency (``--concurrency``, each client on its own keep-alive connection,
``--warmup`` then a ``--duration`` window per endpoint): ``GET /healthz``, an authenticated
``GET /v1/fine_tuning/jobs/{id}`` and the POST; plus ``GET /healthz`` through
httpx.AsyncClient (what that client costs) and an in-process, sequential breakdown of one POST's
server time. The clients are a minimal asyncio HTTP/1.1 client (`RawHttp`) by default:
httpx.AsyncClient spends more CPU per request than the API's bare endpoint does, and client and
server share the machine's cores. No worker runs: the jobs stay queued. Every window prints CPU
seconds per process group, including "other" (processes outside the benchmark): on a shared
machine, read those first.

Runs on the services stack of `tests.harness` (a fresh Postgres database, Redis db
``--redis-db``, moto's S3 server in its own process, the beat, ``uvicorn api.main:app
--workers N`` for each N of ``--api-workers``).

    .venv/bin/python bench/submit.py
    .venv/bin/python bench/submit.py --api-workers 1,2      # as reported
    .venv/bin/python bench/submit.py --concurrency 4 --warmup 0.5 --duration 2   # quick

Exits non-zero when a request answers other than 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    CpuMeter,
    CpuSample,
    Outcome,
    api_client,
    benchmark_parser,
    cpu_line,
    ms,
    parse_benchmark_args,
    pct,
    run_benchmark,
    say,
    table,
    uptime,
)
from bench.jobs import bench_job  # noqa: E402
from bench.rawhttp import RawHttp  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import session_scope  # noqa: E402
from tests.harness import ServiceStack, addition_rows  # noqa: E402


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


@dataclass
class Window:
    """The measured window of a closed loop, and what was seen in it."""

    start: float
    end: float
    latencies: list[float]
    starts: list[float]
    statuses: Counter[str]
    completed: int = 0

    def record(self, t0: float, t1: float, status: str) -> None:
        if t0 >= self.start:
            self.statuses[status] += 1
            if status == "200":
                self.latencies.append(t1 - t0)
                self.starts.append(t0 - self.start)
        if self.start <= t1 < self.end and status == "200":
            self.completed += 1


async def closed_loop(
    stack: ServiceStack,
    name: str,
    req: Req,
    concurrency: int,
    warmup: float,
    duration: float,
    raw: bool,
) -> LoadResult:
    """`concurrency` clients, each on its own keep-alive connection, sending its next request as
    soon as the last is answered. Latencies of 200s started in the window; throughput = 200s
    answered inside the window."""
    meter = CpuMeter(stack)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    samples: list[CpuSample] = []
    begin = time.perf_counter()
    window = Window(begin + warmup, begin + warmup + duration, [], [], Counter())
    headers = {**req.headers, "Content-Type": "application/json"} if req.body else req.headers

    async def one_client(client: httpx.AsyncClient) -> None:
        conn = RawHttp(stack.url) if raw else None
        try:
            while (t0 := time.perf_counter()) < window.end:
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
                window.record(t0, time.perf_counter(), status)
        finally:
            if conn is not None:
                await conn.close()

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
        samples.append(meter.sample())
        await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
        samples.append(meter.sample())

    async with api_client(stack, limits=limits, timeout=httpx.Timeout(60.0)) as client:
        await asyncio.gather(sampler(), *(one_client(client) for _ in range(concurrency)))
    return LoadResult(
        name,
        window.latencies,
        window.starts,
        window.statuses,
        window.completed,
        duration,
        CpuMeter.delta(samples[0], samples[1]),
    )


def count_jobs(settings: Settings) -> int:
    with session_scope(settings) as session:
        return int(session.scalar(text("SELECT count(*) FROM jobs")) or 0)


async def bench_submit(
    stack: ServiceStack,
    headers: dict[str, str],
    file_id: str,
    concurrency: int,
    warmup: float,
    duration: float,
    raw: bool,
) -> list[LoadResult]:
    body = bench_job(file_id)
    async with api_client(stack) as c:
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


class PhaseTimer:
    """Seconds spent per named phase, by wrapping the functions that do them."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.counts: Counter[str] = Counter()

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.spent[name] += time.perf_counter() - t0

        return wrapper

    def count(self, name: str) -> Callable[..., None]:
        def counter(*_: Any) -> None:
            self.counts[name] += 1

        return counter

    def clear(self) -> None:
        self.spent.clear()
        self.counts.clear()


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
    body = JobCreate(**bench_job(file_id))
    engine = get_engine(settings)
    timer = PhaseTimer()
    original_create, original_relay = job_service.create_job, routes.relay_outbox
    original_ping = engine.dialect.do_ping
    original_send = app.state.publish_job.app.send_task

    def ping(conn: Any) -> bool:
        timer.counts["pings"] += 1
        return bool(original_ping(conn))

    on_statement, on_commit = timer.count("statements"), timer.count("commits")
    event.listen(engine, "before_cursor_execute", on_statement)
    event.listen(engine, "commit", on_commit)
    setattr(job_service, "create_job", timer.timed("admission", original_create))  # noqa: B010
    setattr(routes, "relay_outbox", timer.timed("relay", original_relay))  # noqa: B010
    app.state.publish_job.app.send_task = timer.timed("publish", original_send)
    setattr(engine.dialect, "do_ping", ping)  # noqa: B010
    try:
        for i in range(n + 20):  # 20 warm-up requests
            if i == 20:
                timer.clear()
            t0 = time.perf_counter()
            tenant = timer.timed("auth", get_current_tenant)(request)
            t1 = time.perf_counter()
            obj = routes.create_job(request, body, tenant, None)
            t2 = time.perf_counter()
            obj.model_dump_json()
            timer.spent["route"] += t2 - t1
            timer.spent["serialize"] += time.perf_counter() - t2
            timer.spent["total"] += time.perf_counter() - t0
    finally:
        setattr(job_service, "create_job", original_create)  # noqa: B010
        setattr(routes, "relay_outbox", original_relay)  # noqa: B010
        app.state.publish_job.app.send_task = original_send
        setattr(engine.dialect, "do_ping", original_ping)  # noqa: B010
        event.remove(engine, "before_cursor_execute", on_statement)
        event.remove(engine, "commit", on_commit)
    return report_breakdown(timer, n)


def report_breakdown(timer: PhaseTimer, n: int) -> list[str]:
    per = {k: v / n * 1000 for k, v in timer.spent.items()}
    counts = timer.counts
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


def load(stack: ServiceStack, args: argparse.Namespace, workers: int, outcome: Outcome) -> None:
    """The closed loops against an API with `workers` processes, and (first size only) the
    in-process breakdown."""
    headers = stack.new_tenant(f"bench-submit-{workers}", max_queued_jobs=100000)
    file_id = stack.upload(headers, addition_rows(20, seed=3))
    say(f"\n== submit: {args.concurrency} clients, API --workers {workers}; {uptime()}")
    results = asyncio.run(
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
    outcome.add(report_submit(workers, results, args.concurrency, args.http_client))
    h, post = results[0], results[2]
    outcome.summary.append(
        f"submit (--workers {workers}, {args.concurrency} clients): POST "
        f"{post.rps:.0f} req/s p50/p99 {ms(pct(post.latencies, 50))}/"
        f"{ms(pct(post.latencies, 99))} ms vs healthz {h.rps:.0f} req/s "
        f"{ms(pct(h.latencies, 50))}/{ms(pct(h.latencies, 99))} ms "
        f"(throughput ratio {post.rps / h.rps:.3f})"
    )
    if workers == args.workers[0]:
        outcome.add(submit_breakdown(stack.settings, headers, file_id, args.breakdown_requests))
    bad = {k: v for r in results for k, v in r.statuses.items() if k != "200"}
    if bad:
        outcome.failures.append(f"submit (--workers {workers}): non-200 {bad}")


def measure(stack: ServiceStack, args: argparse.Namespace) -> Outcome:
    outcome = Outcome([], [], [])
    for workers in args.workers:
        stack.start_api(workers, quiet=True)
        load(stack, args, workers, outcome)
    stack.check_alive("api")
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, "uvicorn --workers of the API, comma-separated (e.g. 1,2)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each load window")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each load window")
    p.add_argument(
        "--breakdown-requests", type=int, default=200, help="POSTs of the in-process breakdown"
    )
    p.add_argument(
        "--http-client",
        choices=("raw", "httpx"),
        default="raw",
        help="the clients: a minimal asyncio HTTP/1.1 client (default) or httpx.AsyncClient "
        "(costs the shared CPU more per request)",
    )
    return parse_benchmark_args(p, argv)


if __name__ == "__main__":
    sys.exit(run_benchmark(parse_args(sys.argv[1:]), measure))
