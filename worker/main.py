"""`python -m worker.main worker|beat|webhooks`: what `make run` and the containers start."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from shared import workers
from shared.config import Settings, get_settings
from worker.celery_app import celery_app, worker_identity
from worker.fleet import Presence
from worker.sweeper import sweep

log = logging.getLogger("worker.main")


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


def run_worker(settings: Settings) -> None:
    """Announce this worker (capacity, queues) in the fleet table, then consume its queues."""
    device, memory = workers.detect_capacity(settings)
    queues = workers.resolve_queues(settings, device, memory)
    presence = Presence(settings, worker_identity(), queues, device, memory)
    presence.start()
    log.info("worker on %s (%.1f GiB) consuming %s", device, memory / 2**30, ",".join(queues))
    try:
        import worker.runner  # noqa: F401  load torch and the engine now, not in the first job

        # One job at a time per GPU, in the worker's main process (solo pool): SIGTERM is a
        # warm shutdown that the running job sees through its should_stop hook.
        celery_app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                f"--queues={','.join(queues)}",
                f"--hostname={worker_identity()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ]
        )
    finally:
        presence.stop()


def main(argv: list[str]) -> None:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    role = argv[0] if argv else "worker"
    if role == "worker":
        run_worker(settings)
    elif role == "beat":
        run_beat(settings.sweep_interval_seconds)
    elif role == "webhooks":  # deliveries only, never a training slot (docs/webhooks.md)
        from worker.webhook_tasks import run_webhook_worker

        run_webhook_worker()
    else:
        sys.exit(f"usage: python -m worker.main worker|beat|webhooks (got {role!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
