"""Following a job's live event stream (`GET /v1/fine_tuning/jobs/{id}/events` with
`Accept: text/event-stream`) across dropped connections.

The service sends `id: <seq>` with every event and ends with `event: done` once the job is
final. A connection that drops, or a stream that ends without `done`, is reopened with
`Last-Event-ID` set to the last id seen: the service resumes right after it, so nothing is
lost or repeated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from qlora_cli.client import (
    ApiError,
    Client,
    Unreachable,
    describe_transport_error,
    display_url,
    error_from_response,
)

# The service sends a keepalive comment every 15 s; three missed ones mean the link is dead.
READ_TIMEOUT_S = 45.0
# Reconnect at once, then back off to this; give up after this many failures in a row
# (about two minutes of an unreachable service).
MAX_BACKOFF_S = 10.0
MAX_FAILURES = 15


@dataclass(frozen=True)
class SseMessage:
    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Server-sent events from a stream's lines (the WHATWG rules this service needs:
    `id`, `event`, multi-line `data`, comments)."""
    event_id: str | None = None
    event = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SseMessage(event_id, event, "\n".join(data))
            event_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


def backoff(failures: int) -> float:
    """0 s for the first retry, then 0.5 s doubling up to MAX_BACKOFF_S."""
    return 0.0 if failures <= 1 else min(MAX_BACKOFF_S, 0.5 * 2 ** (failures - 2))


class EventFollower:
    """Yields a job's events, then its `done` message, reconnecting as needed.
    `on_reconnect(reason)` is told each time a connection is lost."""

    def __init__(
        self,
        client: Client,
        job_id: str,
        *,
        on_reconnect: Callable[[str], None] = lambda _: None,
        sleep: Callable[[float], None] = time.sleep,
        max_failures: int = MAX_FAILURES,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.on_reconnect = on_reconnect
        self.sleep = sleep
        self.max_failures = max_failures
        self.last_event_id: str | None = None
        self.connections = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def __iter__(self) -> Iterator[SseMessage]:
        failures = 0
        path = f"/v1/fine_tuning/jobs/{self.job_id}/events"
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=10.0)
        while True:
            reason: str
            wait = 0.0
            refusal: ApiError | None = None
            try:
                self.connections += 1
                with self.client.http.stream(
                    "GET", path, headers=self._headers(), timeout=timeout
                ) as resp:
                    if resp.status_code == 429 or resp.status_code >= 500:
                        resp.read()  # worth retrying: too many streams now, a service hiccup
                        refusal = error_from_response(resp)
                        reason = f"{refusal.status} {refusal.code or ''}".strip()
                        wait = _seconds(refusal.retry_after)
                    elif resp.status_code >= 400:
                        resp.read()
                        raise error_from_response(resp)
                    else:
                        for message in parse_sse(resp.iter_lines()):
                            failures = 0
                            if message.id is not None:
                                self.last_event_id = message.id
                            yield message
                            if message.event == "done":
                                return
                        reason = "the stream ended before the job did"
            except httpx.TransportError as exc:
                reason = describe_transport_error(exc)
            failures += 1
            if failures >= self.max_failures:
                if refusal is not None:
                    raise refusal
                raise Unreachable(
                    f"lost the event stream of {self.job_id} at "
                    f"{display_url(self.client.base_url)}: {reason} ({failures} tries)"
                )
            self.on_reconnect(reason)
            self.sleep(max(wait, backoff(failures)))


def _seconds(value: str | None) -> float:
    try:
        return min(60.0, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0
