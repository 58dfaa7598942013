"""The beat's periodic sweep: expired leases, the outbox relay, old idempotency keys."""

from __future__ import annotations

import logging
from typing import Any

from shared.config import get_settings
from shared.db import session_scope
from shared.events import configure_publisher
from shared.jobs import leases
from worker.celery_app import publish_job

log = logging.getLogger("worker.sweeper")


def sweep() -> dict[str, Any]:
    settings = get_settings()
    configure_publisher(settings.redis_url)
    with session_scope(settings) as session:
        requeued, failed, cancelled = leases.sweep_leases(session)
        republished = leases.republish_stale_queued(session)
        expired = leases.expire_idempotency_keys(session)
    # Publishing happens after the requeue commit, so a message never precedes its state.
    with session_scope(settings) as session:
        sent = leases.publish_outbox(session, leases.unsent_outbox(session), publish_job)
    report = {
        "requeued": requeued,
        "failed": failed,
        "cancelled": cancelled,
        "republished": republished,
        "published": len(sent),
        "expired_keys": expired,
    }
    if any(report.values()):
        log.info("sweep: %s", report)
    return report
