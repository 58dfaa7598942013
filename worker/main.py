"""`python -m worker.main worker|beat`: the commands `make run` and the containers start."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from shared.config import get_settings
from worker.celery_app import celery_app, worker_identity
from worker.sweeper import sweep


def run_beat(interval: float) -> None:
    """The sweeper on a timer, in this process. It is not a Celery beat task on purpose: the
    workers run one job at a time, so a sweep message would wait behind hours of training."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log = logging.getLogger("worker.beat")
    log.info("sweeping every %.1fs", interval)
    while not stop.is_set():
        try:
            sweep()
        except Exception:  # a database or broker outage: try again next tick
            log.exception("sweep failed")
        stop.wait(interval)
    log.info("beat stopped")


def main(argv: list[str]) -> None:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    role = argv[0] if argv else "worker"
    if role == "worker":
        import worker.runner  # noqa: F401  load torch and the engine now, not in the first job

        # One job at a time per GPU, in the worker's main process (solo pool): SIGTERM is a
        # warm shutdown that the running job sees through its should_stop hook.
        celery_app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                f"--queues={','.join(settings.queues)}",
                f"--hostname={worker_identity()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    elif role == "beat":
        run_beat(settings.sweep_interval_seconds)
    else:
        sys.exit(f"usage: python -m worker.main worker|beat (got {role!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
