"""What `qlora` exits with. A script can tell "the job failed" from "the API said no" from
"the service is unreachable" without reading the output (docs/cli.md lists them)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # the command did what it was asked; for `jobs watch`: the job succeeded
    ERROR = 1  # the API answered with an error (any 4xx or 5xx), or a local problem (a file)
    USAGE = 2  # a wrong flag or argument (click's own code)
    UNREACHABLE = 3  # no answer from the API: connection refused, DNS, timeout, TLS
    JOB_FAILED = 10  # `jobs watch`: the job ended `failed`
    JOB_CANCELLED = 11  # `jobs watch`: the job ended `cancelled`
    JOB_OTHER = 12  # `jobs watch`: the job ended in a state this client does not know
    INTERRUPTED = 130  # Ctrl-C


def for_job_status(status: str | None) -> ExitCode:
    """The exit code of `jobs watch` for a job's final status."""
    if status == "succeeded":
        return ExitCode.OK
    if status == "failed":
        return ExitCode.JOB_FAILED
    if status == "cancelled":
        return ExitCode.JOB_CANCELLED
    return ExitCode.JOB_OTHER
