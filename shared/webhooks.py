"""Webhooks: a tenant's endpoints, and signed deliveries of its jobs' status changes.

A delivery is written in the same transaction as the transition it announces (`set_status`
calls `enqueue_job_event`), together with an outbox row on the `webhooks` queue; the relay sends
it after the commit to `worker.webhook_tasks`, whose worker never runs training. One attempt:
`claim` (a conditional update, so a duplicate message never sends twice), `send` outside any
transaction, `record`. Retries are outbox rows deferred by an exponential backoff, bounded in
attempts and in time. See docs/webhooks.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.broker import WEBHOOK_QUEUE
from shared.config import Settings
from shared.errors import Invalid, NotFound
from shared.ids import new_id
from shared.models import Job, OutboxMessage, WebhookDelivery, WebhookEndpoint, utcnow
from shared.pagination import newest_first

log = logging.getLogger(__name__)

# The job statuses a tenant can subscribe to: OpenAI's three outcomes plus running and paused.
STATUS_EVENTS = {
    "running": "fine_tuning.job.running",
    "paused": "fine_tuning.job.paused",
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}
EVENT_TYPES = tuple(STATUS_EVENTS.values())
MAX_URL_CHARS = 2048
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
USER_AGENT = "qlora-service-webhooks/1"
# A claimed attempt holds its delivery this long beyond the request timeout; a message that
# finds the delivery held (a duplicate, or the recovery message of a live attempt) does nothing.
CLAIM_MARGIN_SECONDS = 2.0

Resolver = Callable[[str, int], Sequence[str]]


class DeliveryStatus:
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# --------------------------------------------------------------------------- URL validation


class UnsafeAddress(Exception):
    """The host resolves to an address webhooks may not reach; `kind` says which sort."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def address_kind(address: str) -> str | None:
    """Why webhooks may not target `address` ("loopback", "private", ...), None if public."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id names no address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return address_kind(str(embedded))
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for kind, hit in checks:
        if hit:
            return kind
    return None if ip.is_global else "non-public"


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal, in any form `getaddrinfo` accepts,
    resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(
    host: str, port: int, *, allow_private: bool, resolve: Resolver = resolve_host
) -> list[str]:
    """The host's addresses; raises `UnsafeAddress` if any one of them is not public (unless
    `allow_private`), so a name with one public and one internal address is refused too."""
    addresses = list(resolve(host, port))
    if not addresses:
        raise OSError("no address")
    if not allow_private:
        for address in addresses:
            kind = address_kind(address)
            if kind is not None:
                raise UnsafeAddress(kind)
    return addresses


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    host_header: str


def parse_url(url: str) -> Target:
    """The parts of an http(s) URL a delivery needs; raises `Invalid` naming what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise Invalid(
            f"the URL is longer than {MAX_URL_CHARS} characters", param="url", code="url_too_long"
        )
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Invalid(
            "the URL must not contain spaces or control characters", param="url", code="invalid_url"
        )
    if not url.isascii():
        raise Invalid(
            "the URL must be ASCII: write an international host name in its xn-- form and "
            "percent-encode the path",
            param="url",
            code="invalid_url",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise Invalid("the URL could not be parsed", param="url", code="invalid_url") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Invalid("webhook URLs must use http or https", param="url", code="invalid_url_scheme")
    if "@" in parts.netloc:
        raise Invalid(
            "webhook URLs must not carry credentials (user:password@)",
            param="url",
            code="invalid_url",
        )
    if parts.fragment or url.endswith("#"):
        raise Invalid("webhook URLs must not have a #fragment", param="url", code="invalid_url")
    host = parts.hostname
    if not host:
        raise Invalid("the URL has no host", param="url", code="invalid_url")
    if port == 0:
        raise Invalid("the URL's port must be 1-65535", param="url", code="invalid_url")
    default = 443 if scheme == "https" else 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(
        scheme=scheme, host=host, port=port or default, path=path, host_header=parts.netloc
    )


def validate_url(url: str, *, allow_private: bool, resolve: Resolver = resolve_host) -> str:
    """`url` if a webhook may be registered for it: http(s), no credentials, a host that
    resolves, and (unless `allow_private`) only to public addresses."""
    target = parse_url(url)
    try:
        checked_addresses(target.host, target.port, allow_private=allow_private, resolve=resolve)
    except UnsafeAddress as exc:
        raise Invalid(
            f"the URL's host resolves to a {exc.kind} address; webhooks only reach public "
            "addresses unless the service's administrator allows private ones",
            param="url",
            code="private_address",
        ) from None
    except (OSError, UnicodeError, ValueError):
        raise Invalid(
            "the URL's host does not resolve", param="url", code="unresolvable_host"
        ) from None
    return url


# --------------------------------------------------------------------------- signing


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_event_id() -> str:
    """An event id in OpenAI's webhook shape (`evt_…`, 120 random bits)."""
    return "evt_" + secrets.token_hex(15)


def sign(secret: str, *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` and the base64 HMAC-SHA256 of
    `{msg_id}.{timestamp}.{body}` keyed with the secret's decoded bytes."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, *, msg_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id=msg_id, timestamp=timestamp, body=body),
    }


def event_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


# --------------------------------------------------------------------------- endpoints


def create_endpoint(
    session: Session,
    *,
    tenant_id: str,
    url: str,
    events: Sequence[str] | None,
    description: str | None,
    settings: Settings,
    resolve: Resolver = resolve_host,
) -> WebhookEndpoint:
    """A new endpoint with a new secret (the caller shows it once). Every event type when
    `events` is None."""
    if events is not None:
        unknown = [e for e in events if e not in EVENT_TYPES]
        if unknown:
            raise Invalid(
                f"unknown event type {unknown[0]!r}; one of: {', '.join(EVENT_TYPES)}",
                param="events",
                code="unknown_event_type",
            )
        if not events:
            raise Invalid(
                "events must name at least one event type (omit it for all of them)",
                param="events",
                code="invalid_value",
            )
    validate_url(url, allow_private=settings.webhooks_allow_private, resolve=resolve)
    count = session.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.tenant_id == tenant_id)
    )
    if (count or 0) >= settings.webhooks_max_endpoints:
        raise Invalid(
            f"a tenant may have at most {settings.webhooks_max_endpoints} webhook endpoints; "
            "delete one first",
            param=None,
            code="too_many_webhooks",
        )
    chosen = list(dict.fromkeys(events)) if events is not None else list(EVENT_TYPES)
    row = WebhookEndpoint(
        id=new_id("webhook"),
        tenant_id=tenant_id,
        url=url,
        description=description,
        event_types=chosen,
        secret=new_secret(),
        disabled=False,
    )
    session.add(row)
    session.flush()
    return row


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}", param="webhook_id")
    return row


def list_endpoints(
    session: Session, *, tenant_id: str, after: str | None, limit: int
) -> tuple[list[WebhookEndpoint], bool]:
    anchor = (
        get_endpoint(session, tenant_id=tenant_id, endpoint_id=after) if after is not None else None
    )
    query = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return newest_first(session, query, WebhookEndpoint, anchor=anchor, limit=limit)


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """Drop the endpoint; its deliveries go with it (ON DELETE CASCADE), so pending ones stop."""
    row = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    session.delete(row)
    session.flush()
    return row


def list_deliveries(
    session: Session, *, tenant_id: str, endpoint_id: str, after: str | None, limit: int
) -> tuple[list[WebhookDelivery], bool]:
    endpoint = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    anchor = None
    if after is not None:
        anchor = session.get(WebhookDelivery, after)
        if anchor is None or anchor.endpoint_id != endpoint.id:
            raise NotFound(f"no delivery {after!r}", param="after")
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    return newest_first(session, query, WebhookDelivery, anchor=anchor, limit=limit)


# --------------------------------------------------------------------------- events


def _schedule(session: Session, delivery_id: str, at: datetime) -> None:
    """An outbox row that wakes the delivery task for `delivery_id` no earlier than `at`."""
    session.add(OutboxMessage(job_id=delivery_id, queue=WEBHOOK_QUEUE, available_at=at))


def enqueue_job_event(session: Session, job: Job, status: str) -> list[WebhookDelivery]:
    """A delivery per subscribed endpoint of the job's tenant for the job's move to `status`,
    in the caller's transaction (nothing when no endpoint listens)."""
    event_type = STATUS_EVENTS.get(status)
    if event_type is None:
        return []
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.disabled.is_(False)
        )
    ).all()
    targets = [e for e in endpoints if event_type in e.event_types]
    if not targets:
        return []
    now = utcnow()
    event = {
        "id": new_event_id(),
        "object": "event",
        "created_at": int(now.timestamp()),
        "type": event_type,
        "data": {"id": job.id},
    }
    rows = []
    for endpoint in targets:
        row = WebhookDelivery(
            id=new_id("webhook_delivery"),
            endpoint_id=endpoint.id,
            tenant_id=job.tenant_id,
            job_id=job.id,
            event_id=event["id"],
            event_type=event_type,
            payload=event,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
        _schedule(session, row.id, now)
        rows.append(row)
    session.flush()
    return rows


# --------------------------------------------------------------------------- delivery


def retry_delay(attempt: int, settings: Settings) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): base, 2x, 4x, ...,
    capped at the maximum interval."""
    delay = settings.webhooks_retry_base_seconds * 2 ** min(attempt - 1, 30)
    return float(min(delay, settings.webhooks_retry_max_interval_seconds))


@dataclass(frozen=True)
class Claim:
    delivery_id: str
    url: str
    secret: str
    body: bytes
    attempt: int


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    status_code: int | None
    error: str | None


def _aware(value: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every one stored is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _finish(delivery: WebhookDelivery, status: str, *, error: str | None = None) -> None:
    delivery.status = status
    delivery.next_attempt_at = None
    if error is not None:
        delivery.last_error = error


def _is_over(delivery: WebhookDelivery, settings: Settings, now: datetime) -> bool:
    window = timedelta(seconds=settings.webhooks_retry_window_seconds)
    return (
        delivery.attempts >= settings.webhooks_max_attempts
        or now >= _aware(delivery.created_at) + window
    )


def claim(
    session: Session, delivery_id: str, *, settings: Settings, now: datetime | None = None
) -> Claim | None:
    """Take the next attempt of a pending, due delivery; None when there is nothing to send
    (done, not due yet, held by a live attempt, its endpoint gone or disabled, out of budget).

    The claim holds the delivery for the request timeout plus a margin and schedules a
    recovery message for then: if this process dies mid-attempt, that message retries."""
    now = now or utcnow()
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.status != DeliveryStatus.PENDING:
        return None
    if delivery.next_attempt_at is not None and _aware(delivery.next_attempt_at) > now:
        # Early (a duplicate, a live attempt's recovery message, another clock): make sure a
        # message still comes at the due time, then leave it.
        pending = session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.job_id == delivery_id, OutboxMessage.sent_at.is_(None))
        )
        if not pending:
            _schedule(session, delivery_id, delivery.next_attempt_at)
        return None
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is None or endpoint.disabled:
        _finish(delivery, DeliveryStatus.FAILED, error="the endpoint is disabled")
        return None
    if _is_over(delivery, settings, now):
        _finish(
            delivery,
            DeliveryStatus.FAILED,
            error=delivery.last_error or "no answer was recorded for the last attempt",
        )
        return None
    hold = now + timedelta(seconds=settings.webhooks_timeout_seconds + CLAIM_MARGIN_SECONDS)
    won = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.attempts == delivery.attempts,
        )
        .values(attempts=delivery.attempts + 1, next_attempt_at=hold, last_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:  # type: ignore[attr-defined]
        return None
    _schedule(session, delivery_id, hold)
    session.flush()
    return Claim(
        delivery_id=delivery_id,
        url=endpoint.url,
        secret=endpoint.secret,
        body=event_body(delivery.payload),
        attempt=delivery.attempts + 1,
    )


def record(
    session: Session,
    delivery_id: str,
    result: AttemptResult,
    *,
    settings: Settings,
    now: datetime | None = None,
) -> str:
    """Write an attempt's outcome: succeeded, a retry after the backoff, or failed for good.
    Returns the delivery's status."""
    now = now or utcnow()
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return "gone"
    delivery.last_status_code = result.status_code
    delivery.last_error = None if result.ok else result.error
    delivery.updated_at = now
    if result.ok:
        _finish(delivery, DeliveryStatus.SUCCEEDED)
        return delivery.status
    retry_at = now + timedelta(seconds=retry_delay(delivery.attempts, settings))
    if _is_over(delivery, settings, retry_at):
        _finish(delivery, DeliveryStatus.FAILED)
        return delivery.status
    delivery.next_attempt_at = retry_at
    _schedule(session, delivery_id, retry_at)
    session.flush()
    return delivery.status


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with SNI and certificate checks on the name."""

    def __init__(self, address: str, port: int, *, server_hostname: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._server_hostname = server_hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(  # type: ignore[attr-defined]
            self.sock, server_hostname=self._server_hostname
        )


def send(
    url: str,
    *,
    secret: str,
    msg_id: str,
    body: bytes,
    timeout: float,
    allow_private: bool,
    resolve: Resolver = resolve_host,
) -> AttemptResult:
    """One signed POST, to an address resolved and checked now (so a DNS change after the
    registration cannot point a delivery inside). Redirects are not followed; the response
    body is never read. The error text is the service's own words, safe to show the tenant."""
    try:
        target = parse_url(url)
    except Invalid:
        return AttemptResult(False, None, "the endpoint URL is not valid")
    try:
        address = checked_addresses(
            target.host, target.port, allow_private=allow_private, resolve=resolve
        )[0]
    except UnsafeAddress as exc:
        return AttemptResult(False, None, f"the host resolves to a {exc.kind} address")
    except (OSError, UnicodeError, ValueError):
        return AttemptResult(False, None, "the host did not resolve")
    headers = {
        "Host": target.host_header,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        **signed_headers(secret, msg_id=msg_id, body=body, timestamp=int(time.time())),
    }
    conn: http.client.HTTPConnection
    if target.scheme == "https":
        conn = _PinnedHTTPSConnection(
            address, target.port, server_hostname=target.host, timeout=timeout
        )
    else:
        conn = http.client.HTTPConnection(address, target.port, timeout=timeout)
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        status = conn.getresponse().status
    except TimeoutError:
        return AttemptResult(False, None, f"no answer within {timeout:g} s")
    except ConnectionRefusedError:
        return AttemptResult(False, None, "the connection was refused")
    except ssl.SSLError:
        return AttemptResult(False, None, "the TLS handshake failed (certificate or protocol)")
    except (http.client.HTTPException, ValueError):
        return AttemptResult(False, None, "the answer was not valid HTTP")
    except OSError:
        return AttemptResult(False, None, "the connection failed")
    finally:
        conn.close()
    if 200 <= status < 300:
        return AttemptResult(True, status, None)
    if 300 <= status < 400:
        return AttemptResult(False, status, f"HTTP {status}: redirects are not followed")
    return AttemptResult(False, status, f"HTTP {status}")


def deliver(
    session_scope: Callable[[], Any],
    delivery_id: str,
    *,
    settings: Settings,
    resolve: Resolver = resolve_host,
) -> str:
    """One attempt of a delivery: claim (one transaction), send (none), record (another)."""
    with session_scope() as session:
        claimed = claim(session, delivery_id, settings=settings)
    if claimed is None:
        return "skipped"
    result = send(
        claimed.url,
        secret=claimed.secret,
        msg_id=delivery_id,
        body=claimed.body,
        timeout=settings.webhooks_timeout_seconds,
        allow_private=settings.webhooks_allow_private,
        resolve=resolve,
    )
    with session_scope() as session:
        status = record(session, delivery_id, result, settings=settings)
    log.info(
        "webhook %s attempt %d: %s (%s)",
        delivery_id,
        claimed.attempt,
        status,
        result.status_code or result.error,
    )
    return status
