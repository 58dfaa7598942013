"""The workers' Celery application (the contract itself lives in `shared.broker`)."""

from __future__ import annotations

import os
import socket

from shared.broker import RUN_JOB_TASK, JobPublisher, make_celery
from shared.config import get_settings

__all__ = ["RUN_JOB_TASK", "celery_app", "publish_job", "worker_identity"]


def worker_identity() -> str:
    """The lease owner name of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


celery_app = make_celery(
    get_settings(), include=["worker.tasks", "worker.webhook_tasks", "worker.merge_tasks"]
)
publish_job = JobPublisher(celery_app)
