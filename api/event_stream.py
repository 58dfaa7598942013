"""The SSE response of a job's events: gives its tenant's stream slot back however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that calls `release` once it is over: every event sent, the
    watcher dropped, or the client gone (Starlette stops the stream on `http.disconnect`)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], *, release: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = content
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()  # the watcher leaves its job's reader now, not at collection
