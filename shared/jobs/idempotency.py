"""`Idempotency-Key`: the first answer to a (tenant, key) is the answer to every retry.

The key row is inserted, and committed, before the work starts, so a concurrent duplicate
sees it (409 while in flight) instead of doing the work twice. The response is stored in the
same transaction as the job. A failed attempt deletes the row so a retry can run again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import Conflict, Invalid
from shared.jobs.leases import aware
from shared.models import IdempotencyKey, utcnow

TTL = timedelta(hours=24)
ABANDONED_AFTER = timedelta(minutes=2)  # an in-flight row older than this lost its process
MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: dict[str, Any]


def request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_CHARS or any(ord(c) < 32 for c in key):
        raise Invalid("Idempotency-Key must be 1-255 printable characters", param="Idempotency-Key")
    return key


def begin(
    sessions: sessionmaker[Session], *, tenant_id: str, key: str, digest: str
) -> StoredResponse | None:
    """Reserve the key; returns the stored response when this is a replay."""
    for _ in range(3):
        try:
            with sessions.begin() as session:
                row = session.scalar(
                    select(IdempotencyKey)
                    .where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
                    .with_for_update()
                )
                now = utcnow()
                if row is not None:
                    expires_at = aware(row.expires_at)
                    created_at = aware(row.created_at)
                    assert expires_at is not None and created_at is not None
                    abandoned = row.response_status is None and now - created_at > ABANDONED_AFTER
                    if expires_at < now or abandoned:
                        session.delete(row)
                        session.flush()
                    elif row.request_hash != digest:
                        raise Invalid(
                            "this Idempotency-Key was used with a different request body",
                            param="Idempotency-Key",
                            code="idempotency_key_reused",
                        )
                    elif row.response_status is None:
                        raise Conflict(
                            "a request with this Idempotency-Key is still in progress",
                            param="Idempotency-Key",
                            code="idempotency_key_in_flight",
                        )
                    else:
                        return StoredResponse(row.response_status, row.response_body or {})
                session.add(
                    IdempotencyKey(
                        tenant_id=tenant_id,
                        key=key,
                        request_hash=digest,
                        created_at=now,
                        expires_at=now + TTL,
                    )
                )
            return None
        except IntegrityError:
            continue  # a concurrent request inserted it first: read it on the next pass
    raise Conflict(
        "a request with this Idempotency-Key is still in progress",
        param="Idempotency-Key",
        code="idempotency_key_in_flight",
    )


def complete(
    session: Session, *, tenant_id: str, key: str, status: int, body: dict[str, Any]
) -> None:
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key
        )
    )
    if row is not None:
        row.response_status = status
        row.response_body = body
        session.flush()


def abandon(sessions: sessionmaker[Session], *, tenant_id: str, key: str) -> None:
    with sessions.begin() as session:
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.tenant_id == tenant_id,
                IdempotencyKey.key == key,
                IdempotencyKey.response_status.is_(None),
            )
        )
