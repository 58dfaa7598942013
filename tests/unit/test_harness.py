"""The test and benchmark harness itself: importable without pytest, process groups stopped
whatever they do with SIGTERM, Redis databases leased to one stack at a time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import services
from tests.harness import ROOT, StackError, leased_redis_db, start_process, stop_process


def test_the_harness_imports_without_pytest() -> None:
    code = "import sys, tests.harness; sys.exit('pytest' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


def test_a_child_that_ignores_sigterm_is_killed_with_its_process_group(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    proc = start_process(["-c", code], {}, log)
    deadline = time.monotonic() + 30
    while not log.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(log.read_text().split()[0])
    started = time.monotonic()
    stop_process(proc, timeout=1)
    assert proc.returncode == -9 and time.monotonic() - started < 10
    deadline = time.monotonic() + 10
    while Path(f"/proc/{grandchild}").exists() and "Z" not in _state(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived its group"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_redis_database_is_leased_to_one_holder_at_a_time() -> None:
    services.require("Redis", services.redis_available())
    with leased_redis_db((5, 4)) as first, leased_redis_db((5, 4)) as second:
        assert first != second
        with pytest.raises(StackError), leased_redis_db((5, 4)):
            pass
