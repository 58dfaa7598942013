"""Service overhead: (job wall time - engine time) / job wall time, median of N jobs per size.

Each job (``--overhead-steps 30,150``, ``--overhead-repeats`` of each) is submitted once the
worker is idle (after a warm-up job), with a phase breakdown from stored timestamps and the
adapter's metrics (`wall_seconds` = the engine's whole `train()`).

Runs on the services stack of `tests.harness` (a fresh Postgres database, Redis db
``--redis-db``, moto's S3 server in its own process, the beat, ``uvicorn api.main:app``, one
``python -m worker.main worker``) with the service's default timings.

    .venv/bin/python bench/overhead.py --overhead-steps 30,150    # as reported
    .venv/bin/python bench/overhead.py --overhead-steps 3 --overhead-repeats 1   # quick

Exits non-zero when a job fails; missing the 5 % target is reported but does not change the
exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BenchError,
    Outcome,
    api_client,
    benchmark_parser,
    parse_benchmark_args,
    run_benchmark,
    say,
    table,
    uptime,
)
from bench.jobs import (  # noqa: E402
    IDLE_GAP_S,
    JobRun,
    bench_job,
    job_times,
    run_and_watch,
    start_with_worker,
    stored_events,
    warm_up,
    worker_free_at,
)
from tests.harness import ServiceStack  # noqa: E402

OVERHEAD_TARGET = 0.05


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


def phases(stack: ServiceStack, run: JobRun, metrics: dict[str, float], steps: int) -> OverheadRun:
    """Where one job's wall time went, from the client's clock, the stored timestamps and the
    adapter's metrics."""
    created, started, finished = job_times(stack.settings, run.job_id)
    events = stored_events(stack.settings, run.job_id)
    last = [(t, d) for t, d in events if d.get("step") == steps and "loss" in d]
    if not last:
        raise BenchError(f"no final step event for {run.job_id}")
    t_last, d_last = last[-1]
    engine = float(metrics["wall_seconds"])
    loop = float(metrics["train_tokens"]) / float(d_last["tokens_per_second"])
    return OverheadRun(
        wall=run.t_final - run.t_submit,
        post=run.t_response - run.t_submit,
        queue_wait=started - created,
        prep=(t_last - engine) - started,
        engine=engine,
        engine_setup=engine - loop,
        steps=loop,
        finalize=finished - t_last,
        notify=run.t_final - finished,
        step_count=int(metrics["steps"]),
        job_id=run.job_id,
    )


async def bench_overhead(
    stack: ServiceStack,
    headers: dict[str, str],
    file_id: str,
    steps: int,
    repeats: int,
    detect: str,
    previous: str,
) -> list[OverheadRun]:
    """`repeats` jobs of `steps` steps, each submitted once the worker is free; `previous` is
    the last job this worker ran."""
    runs = []
    async with api_client(stack) as client:
        for i in range(repeats):
            await worker_free_at(stack, previous)  # from an idle worker, as a queue of one sees
            await asyncio.sleep(IDLE_GAP_S)
            run = await run_and_watch(client, headers, bench_job(file_id, max_steps=steps), detect)
            previous = run.job_id
            if run.status != "succeeded":
                raise BenchError(f"overhead job {run.job_id} ended {run.status}: {run.job}")
            adapter = (
                await client.get(f"/v1/adapters/{run.job['adapter_id']}", headers=headers)
            ).json()
            o = phases(stack, run, adapter["metrics"], steps)
            runs.append(o)
            say(
                f"  run {i + 1}/{repeats}: wall {o.wall:.2f}s, engine {o.engine:.2f}s, "
                f"steps {o.steps:.2f}s -> overhead {(o.wall - o.engine) / o.wall * 100:.1f}% "
                f"of wall vs engine, {(o.wall - o.steps) / o.wall * 100:.1f}% vs step loop"
            )
    return runs


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


def summary_line(runs: list[OverheadRun], steps: int) -> str:
    oe = statistics.median((r.wall - r.engine) / r.wall for r in runs)
    os_ = statistics.median((r.wall - r.steps) / r.wall for r in runs)
    verdict = "meets" if oe < OVERHEAD_TARGET else "MISSES"
    return (
        f"service overhead ({steps}-step job, median of {len(runs)}): {oe * 100:.1f}% vs "
        f"engine train() ({verdict} the {OVERHEAD_TARGET * 100:.0f}% target), "
        f"{os_ * 100:.1f}% vs the step loop; job wall "
        f"{statistics.median(r.wall for r in runs):.2f}s, engine "
        f"{statistics.median(r.engine for r in runs):.2f}s"
    )


def measure(stack: ServiceStack, args: argparse.Namespace) -> Outcome:
    outcome = Outcome([], [], [])
    headers, file_id = start_with_worker(stack, args.workers[0])
    previous = asyncio.run(warm_up(stack, headers, file_id, args.queue_detect))
    for steps in args.steps:
        say(f"\n== overhead: {args.overhead_repeats} x {steps} steps; {uptime()}")
        runs = asyncio.run(
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
        previous = runs[-1].job_id
        outcome.add(report_overhead(runs, steps))
        outcome.summary.append(summary_line(runs, steps))
    stack.stop("worker")
    stack.check_alive("api")
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = benchmark_parser(
        __doc__, "uvicorn --workers of the API (the first of a comma-separated list)"
    )
    p.add_argument(
        "--overhead-steps",
        default="30",
        help="max_steps of the overhead jobs; comma-separated for several sizes (e.g. 30,150)",
    )
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--queue-detect", choices=("sse", "poll"), default="sse")
    args = parse_benchmark_args(p, argv)
    args.steps = [int(n) for n in args.overhead_steps.split(",")]
    return args


if __name__ == "__main__":
    sys.exit(run_benchmark(parse_args(sys.argv[1:]), measure))
