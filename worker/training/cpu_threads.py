"""How many threads torch uses for training on the CPU: measured, not assumed.

torch runs every operator above a small size on an OpenMP team of one thread per core, and
every such operator ends at a barrier. A QLoRA micro-step is thousands of operators (LoRA
dropout, casts, rank-r matmuls, 4-bit dequantization), most of them small. When the cores
are also busy with other processes, a team thread is descheduled at almost every barrier and
the others wait for it a scheduler slice (milliseconds, spinning and yielding: system time),
so each small operator costs milliseconds instead of a fraction of one. On 2 shared cores
that made a one-step run of a 142M-parameter base take minutes (issue 8, item 7).

So the engine picks the thread count by timing a short probe shaped like a training step
(elementwise operators, casts and one matmul at hidden size 1024) at each candidate count,
the candidates being 1, half and all of the CPUs this process may use, and keeps the fastest.
It probes again every `PROBE_INTERVAL_S` of training, between steps, since other work comes
and goes. `TRAIN_CPU_THREADS=N` (or `OMP_NUM_THREADS`) fixes the count and skips probing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

THREADS_ENV = "TRAIN_CPU_THREADS"
PROBE_INTERVAL_S = 60.0
PROBE_ROUNDS = 3  # timings per candidate, interleaved; the median counts


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):  # no cgroup v2 CPU limit: all CPUs
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    return max(1, cpus)


def fixed_threads() -> int | None:
    """The thread count the environment asks for, if any (`TRAIN_CPU_THREADS`, then
    `OMP_NUM_THREADS`); ValueError if `TRAIN_CPU_THREADS` is not a positive integer."""
    value = os.environ.get(THREADS_ENV)
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: must be a positive integer")
        return int(value)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # torch already follows it
    return None


def candidates(cpus: int) -> list[int]:
    return sorted({1, max(1, cpus // 2), cpus})


def _probe_work() -> Callable[[], None]:
    """About 30 ms of work on one idle core shaped like a micro-step: mostly small
    elementwise operators and casts on [512, 1024] activations, plus one matmul."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=generator)
    w = torch.randn(1024, 1024, generator=generator) / 32

    def work() -> None:
        y = x
        for _ in range(12):
            y = (y * 0.5 + x).to(torch.bfloat16).float()
        _ = y @ w

    return work


def probe(counts: list[int], *, rounds: int = PROBE_ROUNDS) -> dict[int, float]:
    """Median seconds of the probe at each thread count (interleaved, so that load changes
    during the probe hit every count alike). Leaves torch at the last count probed."""
    work = _probe_work()
    timings: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            torch.set_num_threads(n)
            work()  # let the team reach its size before timing
            start = time.perf_counter()
            work()
            timings[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in timings.items()}


@dataclass
class CpuThreads:
    """Owns torch's intra-op thread count for one training session on the CPU.

    `start()` sets it (fixed by the environment, or probed), `between_steps()` probes again
    when `interval_s` has passed, `restore()` puts back what the process had before.
    """

    interval_s: float = PROBE_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    threads: int = 0
    source: str = ""  # "environment" or "probe"
    last_timings: dict[int, float] = field(default_factory=dict)
    choices: list[int] = field(default_factory=list)  # the count chosen, at each change
    _previous: int = 0
    _probed_at: float = 0.0

    def start(self) -> int:
        self._previous = torch.get_num_threads()
        fixed = fixed_threads()
        if fixed is not None:
            self.source = "environment"
            self._set(fixed)
        else:
            self.source = "probe"
            self._probe()
        return self.threads

    def between_steps(self) -> int:
        """Re-probe if due; returns the thread count in force."""
        if self.source == "probe" and self.clock() - self._probed_at >= self.interval_s:
            self._probe()
        return self.threads

    def restore(self) -> None:
        if self._previous:
            torch.set_num_threads(self._previous)

    def _probe(self) -> None:
        counts = candidates(available_cpus())
        self.last_timings = probe(counts) if len(counts) > 1 else {counts[0]: 0.0}
        best = min(self.last_timings, key=lambda n: (self.last_timings[n], -n))
        if best != self.threads:
            log.info(
                "CPU threads: %d (probe seconds by thread count: %s)",
                best,
                {n: round(t, 4) for n, t in self.last_timings.items()},
            )
        self._set(best)
        self._probed_at = self.clock()

    def _set(self, n: int) -> None:
        torch.set_num_threads(n)
        if n != self.threads:
            self.choices.append(n)  # each change, in order
        self.threads = n
