"""Child processes of a stack: free ports, a clean environment, start in a process group with a
log file, stop with SIGTERM then SIGKILL, wait for HTTP readiness, read log tails."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
# Settings fields are dropped from the inherited environment, so nothing outside the stack can
# point its processes at another database, broker or store; so are pytest's and coverage's.
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)
RUNNER_ENV_PREFIXES = ("PYTEST", "COV")


class StackError(RuntimeError):
    """A process of a stack did not start, died, or an HTTP call to it failed."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def inherited_env(**extra: str) -> dict[str, str]:
    """This process's environment less the service settings and the test runner's variables,
    plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in SETTINGS_ENV and not k.startswith(RUNNER_ENV_PREFIXES)
    }
    env.update(extra)
    return env


def start_process(
    args: list[str], env: Mapping[str, str], log: Path, *, python: bool = True
) -> subprocess.Popen[bytes]:
    """Start `python args...` (or `args` as given) from the repository root, leading its own
    process group, stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, *args] if python else args,
            cwd=ROOT,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60
) -> None:
    """Send `sig` to the child's process group, wait up to `timeout`, then SIGKILL the group."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGCONT)  # a frozen (SIGSTOP) child cannot act on SIGTERM
    _signal_group(proc, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def running(
    args: list[str], env: Mapping[str, str], log: Path, *, stop_timeout: float = 20
) -> Iterator[subprocess.Popen[bytes]]:
    """`start_process` for the length of a `with` block."""
    proc = start_process(args, env, log)
    try:
        yield proc
    finally:
        stop_process(proc, timeout=stop_timeout)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_tree(pid: int) -> list[int]:
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


def answers(url: str, timeout: float = 2) -> bool:
    """Whether `url` answers 200."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_http(
    url: str,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 60,
    any_status: bool = False,
) -> None:
    """Poll `url` until it answers 200 (any status with `any_status`); fail early when `proc`
    exits, with the tail of `log`."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log)}")
        if any_status:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url, timeout=2)
                return
        elif answers(url):
            return
        if time.monotonic() > deadline:
            raise StackError(f"{url} did not answer in {timeout:.0f}s:\n{_tail(log)}")
        time.sleep(0.2)


def wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, needle: str, *, timeout: float = 180
) -> None:
    """Wait until `needle` appears in `log` (e.g. a Celery worker's " ready.")."""
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise StackError(f"{proc.args!r} exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{needle!r} not in {log.name} after {timeout:.0f}s:\n{log_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path | None) -> str:
    return "(no log)" if log is None else log_tail(log)
