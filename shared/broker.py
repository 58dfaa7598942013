"""The publishing contract between the API, the beat and the workers.

Task name, queue naming and the Celery app factory live here so that the API (which only
publishes) never imports `worker/` and its image needs no torch. A message is only a wake-up
call: its single argument is the job id and its task id is the job id too; the database decides
what runs (see `shared.jobs.runs.claim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from celery import Celery

from shared.config import Settings

RUN_JOB_TASK = "qlora.run_job"
CPU_QUEUE = "cpu"
GPU_QUEUES = ("gpu-24g", "gpu-48g", "gpu-80g")  # one per class in shared.estimate.GPU_CLASSES
# Webhook deliveries (`shared.webhooks`): their own queue and worker, never a training slot.
WEBHOOK_TASK = "qlora.deliver_webhook"
WEBHOOK_QUEUE = "webhooks"
# Adapter merges (`shared.merges`): on the adapter's GPU-class queue, told apart by the id.
MERGE_TASK = "qlora.merge_adapter"
MERGE_ID_PREFIX = "merge-"


def queue_for_class(gpu_class: str | None) -> str:
    """The queue of a GPU class from the estimator (`24g` -> `gpu-24g`); None is the CPU queue."""
    return f"gpu-{gpu_class}" if gpu_class else CPU_QUEUE


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    if settings.broker_url.startswith("sqla+sqlite:///"):  # kombu does not create the folder
        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    app = Celery("qlora", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue=CPU_QUEUE,
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


class JobPublisher:
    """Sends the wake-up message for a job (task id = job id) to its GPU-class queue."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, job_id: str, queue: str) -> None:
        if queue == WEBHOOK_QUEUE:  # an outbox row of `shared.webhooks`: the id is a delivery's
            self.app.send_task(WEBHOOK_TASK, args=[job_id], queue=queue, retry=False)
            return
        if job_id.startswith(MERGE_ID_PREFIX):  # an outbox row of `shared.merges`
            self.app.send_task(MERGE_TASK, args=[job_id], task_id=job_id, queue=queue, retry=False)
            return
        self.app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, queue=queue, retry=False)
