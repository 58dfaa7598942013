"""The heartbeat that keeps a claimed job's lease, whatever the engine is doing.

A background thread renews the lease every `lease_seconds * lease_renew_fraction` from the
claim to the final transition: a base model that loads for minutes, a long evaluation or an
adapter upload no longer loses the job. When a renewal finds the lease gone (this worker was
frozen or cut off past it and another took the job), `held` turns False for good: training
stops at the next step and the runner writes nothing more for the job.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from shared.jobs import runs

log = logging.getLogger("worker.lease")


class LeaseKeeper:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        lease: runs.Lease,
        *,
        lease_seconds: float,
        renew_fraction: float,
    ) -> None:
        self.sessions = sessions
        self.lease = lease
        self.lease_seconds = lease_seconds
        self.interval = max(0.05, lease_seconds * renew_fraction)
        self._lost = threading.Event()
        self._cancel = threading.Event()
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id}", daemon=True)

    @property
    def held(self) -> bool:
        return not self._lost.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def mark_lost(self) -> None:
        """A fenced write was refused: the lease is gone even if no renewal has said so yet."""
        if not self._lost.is_set():
            log.warning("job %s: lease of attempt %d lost", self.lease.job_id, self.lease.attempt)
        self._lost.set()

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.lease_seconds)

    def renew_once(self) -> None:
        with self.sessions.begin() as session:
            state = runs.renew(session, self.lease, lease_seconds=self.lease_seconds)
        if not state.held:
            self.mark_lost()
            return
        if state.cancel_requested:
            self._cancel.set()
        if state.pause_requested:
            self._pause.set()
        else:  # a resume before the worker paused withdraws the request
            self._pause.clear()

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self.held:
            try:
                self.renew_once()
            except Exception as exc:  # the database blinked: try again next beat
                log.warning(
                    "job %s: lease renewal failed (%s); retrying",
                    self.lease.job_id,
                    type(exc).__name__,
                )
