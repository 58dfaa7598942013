"""The beat's periodic sweep: expired leases, the outbox relay, post-commit cleanups and
retention. Every step is its own transaction, so one failing step never blocks the others."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from shared import merges, workers
from shared.config import Settings, get_settings
from shared.db import session_factory, session_scope
from shared.events import configure_publisher
from shared.jobs import leases, outbox, retention
from shared.storage import make_store
from worker.celery_app import publish_job

log = logging.getLogger("worker.sweeper")


def _step(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    try:
        report[name] = fn()
    except Exception as exc:  # a dependency is down: the next sweep tries again
        log.warning("sweep step %s failed (%s)", name, type(exc).__name__, exc_info=True)
        report[name] = "error"


def _did_something(value: Any) -> bool:
    """True when a report holds any non-empty list, non-zero count or failed step."""
    if isinstance(value, dict):
        return any(_did_something(v) for v in value.values())
    return bool(value)


def sweep(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or get_settings()
    configure_publisher(settings.redis_url)
    report: dict[str, Any] = {}

    def recover() -> dict[str, Any]:
        with session_scope(settings) as session:
            requeued, failed, cancelled = leases.sweep_leases(session)
            idle = workers.idle_queues(session, settings)
            republished = leases.republish_stale_queued(session, idle_queues=idle)
        return {
            "requeued": requeued,
            "failed": failed,
            "cancelled": cancelled,
            "republished": republished,
        }

    def stale_merges() -> dict[str, list[str]]:
        # A merge whose worker stopped heartbeating for a lease's length is sent again.
        with session_scope(settings) as session:
            stale_after = timedelta(seconds=settings.lease_seconds)
            return merges.recover_stale(session, stale_after=stale_after)

    def relay() -> int:
        # After the requeue commit, so a message never precedes its state.
        with session_scope(settings) as session:
            return len(outbox.publish(session, outbox.due(session), publish_job))

    def prune() -> dict[str, int]:
        with session_scope(settings) as session:
            return {
                "outbox": outbox.prune_sent(
                    session, older_than=timedelta(hours=settings.outbox_retention_hours)
                ),
                "idempotency_keys": leases.expire_idempotency_keys(session),
            }

    def fleet() -> dict[str, Any]:
        # Pruning first: a worker gone for good no longer counts as serving a queue.
        with session_scope(settings) as session:
            pruned = workers.prune_stale(session, settings)
            flagged = workers.flag_unserved_jobs(session, settings)
        return {"pruned": pruned, "flagged": flagged}

    store = make_store(settings)
    _step(report, "leases", recover)
    _step(report, "merges", stale_merges)
    _step(report, "fleet", fleet)
    _step(report, "published", relay)
    _step(report, "pruned", prune)
    _step(report, "deleted", lambda: retention.drain_deletions(session_factory(settings), store))
    stale_after = timedelta(hours=settings.multipart_abort_after_hours)
    _step(report, "aborted_uploads", lambda: store.abort_stale_uploads(stale_after))
    if _did_something(report):
        log.info("sweep: %s", report)
    return report
