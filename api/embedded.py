"""`make run`: the API, one worker and the beat as child processes of one foreground command.

Ctrl-C (SIGINT) or SIGTERM stops all three and waits for them; if one child dies the others
are stopped too, so the command never leaves a half-running service behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType

GRACE_SECONDS = 20.0


def child_commands(port: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "api": [py, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", port],
        "worker": [py, "-m", "worker.main", "worker"],
        "beat": [py, "-m", "worker.main", "beat"],
    }


def main() -> int:
    port = os.environ.get("PORT", "8000")
    children = {
        name: subprocess.Popen(cmd, start_new_session=True)
        for name, cmd in child_commands(port).items()
    }
    print(f"QLoRA service on http://127.0.0.1:{port} (dashboard at /, Ctrl-C to stop)", flush=True)
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, proc in children.items():
            if proc.poll() is not None:
                print(f"{name} exited with {proc.returncode}; stopping the service", flush=True)
                exit_code = proc.returncode or 1
                stopping = True
        time.sleep(0.5)
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print("stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
