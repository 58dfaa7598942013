"""Thin Celery tasks: each one re-reads the world from the database and calls the domain."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from worker.celery_app import RUN_JOB_TASK, celery_app

log = logging.getLogger("worker.tasks")
F = TypeVar("F", bound=Callable[..., Any])


def house_task(name: str) -> Callable[[F], F]:
    """One place for naming, logging and delivery policy: late ack, no automatic retry
    (the lease and the sweeper decide what runs again)."""

    def wrap(fn: F) -> F:
        def logged(*args: Any, **kwargs: Any) -> Any:
            log.info("%s%s starting", name, args)
            result = fn(*args, **kwargs)
            log.info("%s%s -> %s", name, args, result)
            return result

        logged.__name__ = fn.__name__
        logged.__doc__ = fn.__doc__
        task = celery_app.task(
            name=name, acks_late=True, reject_on_worker_lost=True, max_retries=0
        )(logged)
        return task  # type: ignore[no-any-return]

    return wrap


@house_task(RUN_JOB_TASK)
def run_job(job_id: str) -> str:
    """Claim the job, train it, store the adapter, move its state."""
    from worker.runner import run_job as run

    return run(job_id)
