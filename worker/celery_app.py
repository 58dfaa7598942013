"""The Celery application: Redis in production, SQLite kombu transport on the embedded default.

Imported by the API to publish, so it must stay light: no torch, no engine imports here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from celery import Celery

from shared.config import Settings, get_settings

RUN_JOB_TASK = "qlora.run_job"


def worker_identity() -> str:
    """The lease owner name of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_celery(settings: Settings) -> Celery:
    if settings.broker_url.startswith("sqla+sqlite:///"):  # kombu does not create the folder
        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    app = Celery("qlora", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue="cpu",
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Redis redelivers an unacked message after this long (a worker killed mid-job); the
        # lease sweeper is what actually recovers the job, much sooner.
        broker_transport_options=(
            {"visibility_timeout": 6 * 3600} if settings.broker_url.startswith("redis") else {}
        ),
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


celery_app = make_celery(get_settings())


class JobPublisher:
    """Sends the wake-up message for a job (task id = job id) to its GPU-class queue."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, job_id: str, queue: str, countdown: float | None = None) -> None:
        self.app.send_task(
            RUN_JOB_TASK,
            args=[job_id],
            task_id=job_id,
            queue=queue,
            retry=False,
            countdown=countdown,
        )


publish_job = JobPublisher(celery_app)
