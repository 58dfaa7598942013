"""The transient-fault retry budget: time without progress, not time in all."""

from __future__ import annotations

import time

import pytest

from shared.jobs.faults import TransientFault, retry_transient


class Upload:
    """A resumable upload under a flaky store: each try lands one object (while `advancing`),
    then fails the way a reset connection does, after `try_s` seconds."""

    def __init__(self, objects: int, try_s: float, advancing: int) -> None:
        self.left, self.try_s, self.advancing = objects, try_s, advancing
        self.landed = 0
        self.tries = 0

    def __call__(self) -> str:
        self.tries += 1
        time.sleep(self.try_s)
        if self.tries <= self.advancing:
            self.landed += 1
            self.left -= 1
        if self.left > 0:
            raise ConnectionResetError("reset by peer")
        return "done"


def test_tries_that_land_objects_keep_the_upload_alive_past_the_budget() -> None:
    upload = Upload(objects=6, try_s=0.2, advancing=6)  # 1.2 s of tries, budget 0.5 s
    got = retry_transient(
        upload, what="upload", budget_s=0.5, first_delay_s=0.01, progress=lambda: upload.landed
    )
    assert got == "done" and upload.tries == 6


def test_without_progress_the_same_upload_runs_the_budget_out() -> None:
    upload = Upload(objects=6, try_s=0.2, advancing=6)
    with pytest.raises(TransientFault):
        retry_transient(upload, what="upload", budget_s=0.5, first_delay_s=0.01)
    assert upload.tries < 6


def test_an_upload_that_stops_advancing_runs_the_budget_out() -> None:
    upload = Upload(objects=10, try_s=0.2, advancing=3)  # lands 3, then fails with nothing new
    start = time.monotonic()
    with pytest.raises(TransientFault):
        retry_transient(
            upload, what="upload", budget_s=0.5, first_delay_s=0.01, progress=lambda: upload.landed
        )
    assert upload.landed == 3 and upload.tries > 3
    assert time.monotonic() - start < 5  # bounded: the budget counts from the last progress
