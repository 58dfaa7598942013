"""Run a command in a pseudo-terminal, as a person at a terminal would: its stdout and stderr
are a tty of a known size, so rich draws its live progress bar."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")
# Variables that make rich ignore the terminal or its size.
_TERMINAL_ENV = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES")


def plain(text: str) -> str:
    """Terminal output without escape sequences; a carriage return starts a new line."""
    return _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


@dataclass
class TerminalRun:
    returncode: int
    raw: str  # with the escape sequences

    @property
    def text(self) -> str:
        return plain(self.raw)


def run_in_terminal(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    timeout: float,
    columns: int = 200,
    on_output: Callable[[str], None] | None = None,
) -> TerminalRun:
    """Run `args` on a new pty `columns` wide; `on_output(text so far)` after each read."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    child_env = {k: v for k, v in env.items() if k not in _TERMINAL_ENV}
    child_env.update(TERM="xterm-256color", COLUMNS=str(columns))
    proc = subprocess.Popen(
        list(args), stdin=slave, stdout=slave, stderr=slave, env=child_env, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{args} still running after {timeout} s:\n"
                    + plain(b"".join(chunks).decode(errors="replace")[-3000:])
                )
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None and not select.select([master], [], [], 0)[0]:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side is gone
                break
            if not data:
                break
            chunks.append(data)
            if on_output is not None:
                on_output(plain(b"".join(chunks).decode(errors="replace")))
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return TerminalRun(returncode, b"".join(chunks).decode(errors="replace"))
