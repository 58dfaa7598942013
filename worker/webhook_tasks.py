"""The webhook delivery task, and the worker process that runs it.

`python -m worker.main webhooks` consumes only the `webhooks` queue, in threads: a slow or
failing receiver holds one of its threads for at most the delivery timeout and never a
training worker's slot. Nothing here imports torch (the beat's image runs it as well)."""

from __future__ import annotations

from shared.broker import WEBHOOK_QUEUE, WEBHOOK_TASK
from shared.config import get_settings
from shared.db import session_scope
from shared.webhooks import deliver
from worker.celery_app import celery_app, worker_identity
from worker.tasks import house_task

WEBHOOK_THREADS = 4


@house_task(WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> str:
    """One attempt of a delivery; the next one, if any, is an outbox row it leaves behind."""
    settings = get_settings()
    return deliver(lambda: session_scope(settings), delivery_id, settings=settings)


def run_webhook_worker() -> None:
    """Consume the `webhooks` queue, and nothing else, with a few threads."""
    celery_app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={WEBHOOK_THREADS}",
            "--loglevel=INFO",
            f"--queues={WEBHOOK_QUEUE}",
            f"--hostname=webhooks-{worker_identity()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
