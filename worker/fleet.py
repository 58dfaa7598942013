"""This worker process's presence in the fleet: its `workers` row, kept fresh by a daemon thread.

The runner calls `set_current_job(job_id)` when it takes a job and `set_current_job(None)` when
it is done; the next heartbeat (sent at once) reports it.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field

from shared import workers
from shared.config import Settings
from shared.db import session_factory, unit_of_work

log = logging.getLogger(__name__)

_current_job: str | None = None
_job_changed = threading.Event()


def set_current_job(job_id: str | None) -> None:
    """What this worker is running now (None: idle); the heartbeat reports it."""
    global _current_job
    _current_job = job_id
    _job_changed.set()


def current_job() -> str | None:
    return _current_job


@dataclass
class Presence:
    """Registers the worker, heartbeats every `worker_heartbeat_seconds` (and whenever its job
    changes), unregisters on `stop()`. A database error is logged and retried next tick."""

    settings: Settings
    worker_id: str
    queues: list[str]
    device: str
    memory_bytes: int
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        _job_changed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with unit_of_work(session_factory(self.settings)) as session:
                workers.unregister(session, worker_id=self.worker_id)
        except Exception:
            log.exception("could not unregister worker %s", self.worker_id)

    def _run(self) -> None:
        registered = False
        while not self._stop.is_set():
            try:
                registered = self._beat(registered)
            except Exception:
                log.exception("worker heartbeat failed; retrying in %.0fs", self.interval)
            _job_changed.wait(self.interval)
            _job_changed.clear()

    @property
    def interval(self) -> float:
        return self.settings.worker_heartbeat_seconds

    def _beat(self, registered: bool) -> bool:
        with unit_of_work(session_factory(self.settings)) as session:
            if registered and workers.heartbeat(
                session, worker_id=self.worker_id, current_job_id=current_job()
            ):
                return True
            workers.register(
                session,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                queues=self.queues,
                device=self.device,
                memory_bytes=self.memory_bytes,
            )
            workers.heartbeat(session, worker_id=self.worker_id, current_job_id=current_job())
        return True
