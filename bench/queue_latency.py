"""Queue latency: submit -> ``running`` over N sequential one-step jobs on one idle worker.

After one warm-up job, each job is waited on until it succeeds, and the next one is submitted
once the worker is really idle (its task returned, seen in its log); then a few jobs back to
back (submitted as soon as the previous one was seen `succeeded`). `running` is seen on the
job's SSE stream (or by polling every 20 ms with ``--queue-detect poll``); server-side figures
come from the events' stored timestamps.

Runs on the services stack of `tests.harness` (a fresh Postgres database, Redis db
``--redis-db``, moto's S3 server in its own process, the beat, ``uvicorn api.main:app``, one
``python -m worker.main worker``) with the service's default timings.

    .venv/bin/python bench/queue_latency.py
    .venv/bin/python bench/queue_latency.py --queue-jobs 3 --queue-b2b 1   # quick

Exits non-zero when a job fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BenchError,
    Outcome,
    api_client,
    benchmark_parser,
    ms,
    parse_benchmark_args,
    pct,
    run_benchmark,
    say,
    table,
    uptime,
)
from bench.jobs import (  # noqa: E402
    IDLE_GAP_S,
    JobRun,
    bench_job,
    first_status,
    job_times,
    run_and_watch,
    start_with_worker,
    stored_events,
    worker_free_at,
)
from tests.harness import ServiceStack  # noqa: E402


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

    def record(self, i: int, n: int, run: JobRun, server: float) -> None:
        """Job `i` (0: the warm-up; 1..n: idle worker; above: back to back)."""
        if i == 0:
            self.cold, self.cold_server = run, server
        elif i <= n:
            self.client_submit_to_running.append(run.t_running - run.t_submit)
            self.post.append(run.t_response - run.t_submit)
            self.response_to_running.append(run.t_running - run.t_response)
            self.server_queued_to_running.append(server)
        else:
            self.b2b_client.append(run.t_running - run.t_submit)
            self.b2b_server.append(server)


async def bench_queue(
    stack: ServiceStack, headers: dict[str, str], file_id: str, n: int, b2b: int, detect: str
) -> QueueResult:
    """n jobs each submitted once the worker is idle (after a warm-up job), then `b2b` jobs each
    submitted as soon as the previous one was seen `succeeded`."""
    res = QueueResult()
    async with api_client(stack) as client:
        for i in range(n + 1 + b2b):
            run = await run_and_watch(client, headers, bench_job(file_id), detect)
            if run.status != "succeeded":
                raise BenchError(f"queue job {run.job_id} ended {run.status}: {run.job}")
            events = stored_events(stack.settings, run.job_id)
            server = first_status(events, "running") - first_status(events, "queued")
            label = (
                "warm-up (not counted)"
                if i == 0
                else f"{i}/{n}"
                if i <= n
                else f"b2b {i - n}/{b2b}"
            )
            say(
                f"  job {label}: submit->running {ms(run.t_running - run.t_submit)} ms "
                f"(server {ms(server)} ms), whole job {run.t_final - run.t_submit:.2f}s"
            )
            res.record(i, n, run, server)
            if i < n:  # the next job is an idle-worker one: wait until the worker is free
                free = await worker_free_at(stack, run.job_id)
                res.worker_tail.append(free - job_times(stack.settings, run.job_id)[2])
                await asyncio.sleep(IDLE_GAP_S)
    return res


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
        if values:
            rows.append(
                [label, len(values), ms(pct(values, 50)), ms(pct(values, 99)), ms(max(values))]
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


def measure(stack: ServiceStack, args: argparse.Namespace) -> Outcome:
    outcome = Outcome([], [], [])
    headers, file_id = start_with_worker(stack, args.workers[0])
    say(f"\n== queue: {args.queue_jobs} jobs ({args.queue_detect}); {uptime()}")
    res = asyncio.run(
        bench_queue(stack, headers, file_id, args.queue_jobs, args.queue_b2b, args.queue_detect)
    )
    outcome.add(report_queue(res, args.queue_detect))
    outcome.summary.append(
        f"queue latency (submit -> running, client): p50 "
        f"{ms(pct(res.client_submit_to_running, 50))} ms, p99 "
        f"{ms(pct(res.client_submit_to_running, 99))} ms; server "
        f"p50 {ms(pct(res.server_queued_to_running, 50))} ms; worker busy "
        f"{ms(pct(res.worker_tail, 50))} ms (p50) after committing `succeeded`"
    )
    stack.stop("worker")
    stack.check_alive("api")
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(
        __doc__, "uvicorn --workers of the API (the first of a comma-separated list)"
    )
    p.add_argument("--queue-jobs", type=int, default=15)
    p.add_argument("--queue-detect", choices=("sse", "poll"), default="sse")
    p.add_argument("--queue-b2b", type=int, default=5, help="extra jobs submitted back to back")
    return parse_benchmark_args(p, argv)


if __name__ == "__main__":
    sys.exit(run_benchmark(parse_args(sys.argv[1:]), measure))
