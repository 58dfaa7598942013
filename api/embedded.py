"""`make run`: the API, one worker and the beat as supervised child processes of one command.

A child that dies (an OOM kill of the worker on a laptop, a crash) is restarted with backoff:
1 s, doubling up to 30 s, back to 1 s once it has stayed up a minute. Each death prints one
line. The API is restarted the same way: a dead API is a service nobody can reach, and the
other two children do not depend on it. The worker's interrupted job is recovered by the
sweeper when its lease expires and resumes from its last checkpoint.

Ctrl-C (SIGINT) or SIGTERM stops all three (SIGTERM, then SIGKILL after a grace period) and
waits for them, so the command never leaves a half-running service behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

GRACE_SECONDS = 20.0
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
STABLE_AFTER_SECONDS = 60.0  # a child up this long gets its backoff reset
POLL_SECONDS = 0.2


def child_commands(port: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "api": [py, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", port],
        "worker": [py, "-m", "worker.main", "worker"],
        "beat": [py, "-m", "worker.main", "beat"],
        # Webhook deliveries in their own process: a slow receiver never holds the worker.
        "webhooks": [py, "-m", "worker.main", "webhooks"],
    }


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Child:
    """One supervised process and its restart backoff."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = FIRST_BACKOFF_SECONDS
    restarts: int = 0

    def start(self) -> None:
        # Its own session: the terminal's Ctrl-C reaches only the supervisor, which stops the
        # children in order.
        self.process = subprocess.Popen(self.command, start_new_session=True)
        self.started_at = time.monotonic()
        self.restart_at = None

    def died(self) -> int | None:
        """The exit code of a child that died and has no restart scheduled yet."""
        if self.process is None or self.restart_at is not None:
            return None
        return self.process.poll()

    def schedule_restart(self, now: float) -> float:
        if now - self.started_at >= STABLE_AFTER_SECONDS:
            self.backoff = FIRST_BACKOFF_SECONDS
        delay = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)
        self.restart_at = now + delay
        self.restarts += 1
        return delay

    def restart_due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, deadline: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def supervise(children: list[Child], stopping: threading.Event) -> None:
    """Restart dead children until `stopping` is set (by SIGINT or SIGTERM)."""
    while not stopping.is_set():
        now = time.monotonic()
        for child in children:
            code = child.died()
            if code is not None:
                delay = child.schedule_restart(now)
                print(
                    f"{child.name} died ({describe_exit(code)}); restarting it in {delay:.0f}s "
                    f"(restart {child.restarts})",
                    flush=True,
                )
            elif child.restart_due(now):
                child.start()
        stopping.wait(POLL_SECONDS)


def main() -> int:
    port = os.environ.get("PORT", "8000")
    children = [Child(name, cmd) for name, cmd in child_commands(port).items()]
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.start()
    print(f"QLoRA service on http://127.0.0.1:{port} (dashboard at /, Ctrl-C to stop)", flush=True)
    supervise(children, stopping)
    for child in children:
        child.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for child in children:
        child.wait(deadline)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
