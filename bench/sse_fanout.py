"""SSE fan-out: delivery latency of events to many watchers of one job, against 1 watcher.

This process writes events at a fixed rate (``--sse-rate`` per second for ``--sse-seconds``)
to one queued job, each in its own transaction (its commit publishes the Redis nudge), while
1 and then ``--watchers`` concurrent SSE streams follow the job; it checks loss, dupes and
order. The watchers are a minimal asyncio HTTP/1.1 client (`RawHttp`) by default, or
httpx.AsyncClient (``--http-client httpx``). No worker runs: the job stays queued.

Runs on the services stack of `tests.harness` (a fresh Postgres database, Redis db
``--redis-db``, moto's S3 server in its own process, the beat, ``uvicorn api.main:app
--workers N`` for each N of ``--api-workers``) with the service's default timings.

    .venv/bin/python bench/sse_fanout.py
    .venv/bin/python bench/sse_fanout.py --api-workers 1,2
    .venv/bin/python bench/sse_fanout.py --watchers 5 --sse-seconds 2   # quick

Exits non-zero when a watcher loses, repeats or reorders events, or errors.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    CpuMeter,
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
from bench.rawhttp import RawHttp, sse_events, sse_headers  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db import session_scope  # noqa: E402
from shared.events import configure_publisher, record_event  # noqa: E402
from shared.models import Job  # noqa: E402
from tests.harness import ServiceStack, addition_rows  # noqa: E402
from tests.sse import SseMessage  # noqa: E402

DRAIN_IDLE_S = 20.0  # give up on undelivered events after this long without progress
DRAIN_MAX_S = 240.0


@dataclass
class Watcher:
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    latency: dict[int, float] = field(default_factory=dict)  # bench index -> arrival - data.t
    dupes: int = 0
    out_of_order: int = 0
    last_seq: int = 0
    done: str | None = None
    error: str | None = None

    def receive(self, event: SseMessage, now: float) -> None:
        self.connected.set()
        if event.seq is not None:
            if event.seq <= self.last_seq:
                self.out_of_order += 1
            self.last_seq = event.seq
        payload = event.data.get("data") or {}
        if "bench" in payload:
            index = int(payload["bench"])
            if index in self.latency:
                self.dupes += 1
            else:
                self.latency[index] = now - float(payload["t"])


async def consume(events: AsyncIterator[SseMessage], w: Watcher) -> None:
    async for event in events:
        now = time.time()
        if event.type == "done":
            w.done = str(event.data.get("status"))
            return
        w.receive(event, now)


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

    @classmethod
    def of(
        cls,
        ws: list[Watcher],
        count: int,
        connect_s: float,
        drain_s: float,
        writes: list[float],
        cpu: dict[str, float],
    ) -> SseResult:
        received = [len(w.latency) for w in ws]
        return cls(
            watchers=len(ws),
            events=count,
            connect_s=connect_s,
            latencies=[lat for w in ws for lat in w.latency.values()],
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
            cpu=cpu,
        )


async def drain(ws: list[Watcher], count: int) -> float:
    """Wait until every watcher has every event, or nothing new arrived for DRAIN_IDLE_S;
    returns the seconds waited."""
    t_sent = time.monotonic()
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
    return time.monotonic() - t_sent


async def bench_sse_once(
    stack: ServiceStack,
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
    async with api_client(stack, limits=limits, timeout=timeout) as client:
        resp = await client.post("/v1/fine_tuning/jobs", json=bench_job(file_id), headers=headers)
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
        drain_s = await drain(ws, count)
        after = meter.sample()
        cancel = await client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=headers)
        if cancel.status_code != 200:
            raise BenchError(f"cancel: {cancel.status_code} {cancel.text}")
        _, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return SseResult.of(ws, count, connect_s, drain_s, writes, CpuMeter.delta(before, after))


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


def fan_out(stack: ServiceStack, args: argparse.Namespace, workers: int, outcome: Outcome) -> None:
    """1 watcher, then `--watchers`, on an API with `workers` processes."""
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
            f"  p50 {ms(pct(r.latencies, 50))} ms, p99 {ms(pct(r.latencies, 99))} ms, missing "
            f"{r.missing}, dupes {r.dupes}, errors {len(r.errors)}"
        )
        results.append(r)
        if r.missing or r.dupes or r.errors or r.out_of_order:
            outcome.failures.append(
                f"sse ({n} watchers, --workers {workers}): missing {r.missing}, "
                f"dupes {r.dupes}, out of order {r.out_of_order}, errors {len(r.errors)}"
            )
    outcome.add(report_sse(workers, results, args.sse_rate))
    b, f = results[0], results[-1]
    outcome.summary.append(
        f"SSE (--workers {workers}): 1 watcher p50/p99 "
        f"{ms(pct(b.latencies, 50))}/{ms(pct(b.latencies, 99))} ms; "
        f"{f.watchers} watchers {ms(pct(f.latencies, 50))}/"
        f"{ms(pct(f.latencies, 99))} ms; missing {f.missing}, dupes {f.dupes}"
    )


def measure(stack: ServiceStack, args: argparse.Namespace) -> Outcome:
    outcome = Outcome([], [], [])
    configure_publisher(stack.env["REDIS_URL"])  # this process's events nudge the streams
    try:
        for workers in args.workers:
            stack.start_api(workers, quiet=True)
            fan_out(stack, args, workers, outcome)
        stack.check_alive("api")
    finally:
        configure_publisher(None)
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(__doc__, "uvicorn --workers of the API, comma-separated (e.g. 1,2)")
    p.add_argument("--watchers", type=int, default=200)
    p.add_argument("--sse-rate", type=float, default=20.0, help="events per second")
    p.add_argument("--sse-seconds", type=float, default=10.0)
    p.add_argument(
        "--http-client",
        choices=("raw", "httpx"),
        default="raw",
        help="the watchers' client: a minimal asyncio HTTP/1.1 client (default) or "
        "httpx.AsyncClient (costs the shared CPU more per request)",
    )
    return parse_benchmark_args(p, argv)


if __name__ == "__main__":
    sys.exit(run_benchmark(parse_args(sys.argv[1:]), measure))
