"""What the service benchmarks share: tables and percentiles, the CPU meter, the stack they run
on (`tests.harness.service_stack` with moto in its own process), and the run's frame (signals,
exit codes, the summary).

Each benchmark is a script (`bench/submit.py`, `bench/queue_latency.py`, `bench/overhead.py`,
`bench/sse_fanout.py`); they put the repository root on `sys.path` before importing this.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis
from sqlalchemy import text

from shared.config import Settings
from shared.db import session_scope
from tests.harness import (
    REDIS_URL,
    ROOT,
    ServiceStack,
    StackError,
    inherited_env,
    moto_server,
    postgres_available,
    process_tree,
    redis_available,
    service_stack,
)

JOBS_TESTS_REDIS_DB = 11  # what `tests/jobs` leases first


class BenchError(RuntimeError):
    """A benchmark step failed outright (a job failed, a stream lost events)."""


# --------------------------------------------------------------------------- reporting


def say(message: str = "") -> None:
    print(message, flush=True)


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


def uptime() -> str:
    with open("/proc/loadavg") as fh:
        one, five, fifteen = fh.read().split()[:3]
    return f"load average {one}, {five}, {fifteen} (1/5/15 min) at {time.strftime('%H:%M:%S')}"


def command_line() -> str:
    return f"$ {shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv])}"


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

    def __init__(self, stack: ServiceStack) -> None:
        self.stack = stack

    def sample(self) -> CpuSample:
        groups = {"client": time.process_time()}
        for name in ("api", "worker"):
            proc = self.stack.process(name)
            groups[name] = sum(proc_cpu(p) for p in process_tree(proc.pid)) if proc else 0.0
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


# --------------------------------------------------------------------------- the stack


def benchmark_parser(doc: str | None, api_workers_help: str) -> argparse.ArgumentParser:
    """A parser described by the script's first paragraph, with the stack's options."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--api-workers", default="1", help=api_workers_help)
    parser.add_argument("--redis-db", type=int, default=12, help="Redis database (flushed!)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work dir with the logs")
    return parser


def parse_benchmark_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.api_workers.split(",")]
    if args.redis_db == JOBS_TESTS_REDIS_DB:
        parser.error(f"Redis db {JOBS_TESTS_REDIS_DB} belongs to the jobs tests; pick another")
    return args


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
    redis_version = redis.Redis.from_url(REDIS_URL).info("server").get("redis_version")
    return [
        f"{os.cpu_count()} cores ({model}), {mem_kib / 2**20:.0f} GiB RAM, {gpu}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"Postgres {pg}, Redis {redis_version}, S3 = moto server over HTTP (own process)",
    ]


def build_tiny_model(out: Path) -> Path:
    """The tiny base model, built by a child process (no torch in the benchmark's client)."""
    built = subprocess.run(
        [sys.executable, "-m", "worker.training.tiny", "--out", str(out)],
        cwd=ROOT,
        env=inherited_env(),
        capture_output=True,
        check=False,
    )
    if built.returncode != 0:
        raise BenchError(f"building tiny-llama failed:\n{built.stderr.decode()[-3000:]}")
    return out


@contextlib.contextmanager
def bench_stack(args: argparse.Namespace) -> Iterator[ServiceStack]:
    """The services stack on the service's default timings, moto in its own process, Redis db
    `--redis-db`, the beat running and no API yet (`stack.start_api`); the work dir (logs)
    is removed afterwards unless `--keep-logs`."""
    for name, ok in (("Postgres", postgres_available()), ("Redis", redis_available())):
        if not ok:
            raise BenchError(f"{name} is not reachable (see tests/harness/backends.py for URLs)")
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    try:
        with moto_server(log=work / "logs" / "moto.log") as s3:
            model_dir = build_tiny_model(work / "models" / "tiny-llama")
            with service_stack(
                work, s3=s3, model_dir=model_dir, redis_dbs=(args.redis_db,), api=False
            ) as stack:
                for line in machine_notes(stack.settings):
                    say(line)
                say(
                    f"processes: uvicorn --no-access-log --log-level warning; beat; worker solo "
                    f"pool, OMP_NUM_THREADS=1; service defaults otherwise (lease 60 s, progress "
                    f"writes every 2 s, sweep every 10 s); Redis db {args.redis_db}"
                )
                yield stack
    finally:
        if args.keep_logs:
            say(f"\nlogs kept in {work / 'logs'}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the run


@dataclass
class Outcome:
    """What a benchmark prints at the end: its report, one-line summary, failures."""

    report: list[str]
    summary: list[str]
    failures: list[str]

    def add(self, lines: list[str]) -> None:
        self.report += ["", *lines]
        say("\n" + "\n".join(lines))


def print_outcome(outcome: Outcome, started: float) -> None:
    say("\n==== report")
    say("\n".join(outcome.report).strip())
    say("\n==== summary")
    say(command_line())
    for line in outcome.summary:
        say(f"- {line}")
    for line in outcome.failures:
        say(f"- FAILED: {line}")
    say(
        f"- machine after: {uptime()}; total {time.monotonic() - started:.0f}s; numbers are "
        f"noisy: {os.cpu_count()} cores shared by client, API, Postgres, Redis, worker and "
        "whatever else runs on the machine (see the CPU lines)"
    )


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_benchmark(args: argparse.Namespace, measure: Callable[..., Outcome]) -> int:
    """Bring the stack up, `measure(stack, args)`, print the report and summary; the exit
    status: 0, 1 when a part failed, 2 when the benchmark could not run, 130 on a signal."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    started = time.monotonic()
    say(command_line())
    say(f"machine: {uptime()}")
    try:
        with bench_stack(args) as stack:
            outcome = measure(stack, args)
    except (BenchError, StackError) as exc:
        say(f"\nbenchmark failed: {exc}")
        return 2
    except KeyboardInterrupt:
        say("\ninterrupted; processes stopped and the database dropped")
        return 130
    print_outcome(outcome, started)
    return 1 if outcome.failures else 0


def api_client(stack: ServiceStack, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx.AsyncClient on the stack's API (60 s timeout unless given)."""
    kwargs.setdefault("timeout", httpx.Timeout(60.0))
    return httpx.AsyncClient(base_url=stack.url, **kwargs)
