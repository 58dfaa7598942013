"""The benchmarks' HTTP clients: a minimal asyncio HTTP/1.1 client (`RawHttp`) and SSE event
reading over it or over httpx. The SSE format itself is read by `tests.sse.parse_sse`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

from bench.common import BenchError
from tests.sse import SseMessage, parse_sse


def parse_sse_block(block: str) -> SseMessage | None:
    """One SSE event (the text between blank lines); None for a comment (keepalive)."""
    return next(parse_sse([*block.split("\n"), ""]), None)


def sse_headers(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Accept": "text/event-stream"}


async def sse_events(resp: httpx.Response) -> AsyncIterator[SseMessage]:
    """The events of an httpx stream, comments skipped."""
    lines: list[str] = []
    async for line in resp.aiter_lines():
        if line:
            lines.append(line)
            continue
        event = parse_sse_block("\n".join(lines))
        lines = []
        if event is not None:
            yield event


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one connection, one request at
    a time. It costs the client a fraction of httpx.AsyncClient's CPU per request, which
    matters when the client shares 2 cores with the server it measures (`--http-client`)."""

    def __init__(self, url: str) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _send(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    async def _head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {}
        for line in raw[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        return int(raw[0].split(" ", 2)[1]), headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body of a chunked response, chunk by chunk."""
        assert self.reader is not None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    async def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, bytes]:
        try:
            await self._send(method, path, headers or {}, body)
            status, head = await self._head()
            assert self.reader is not None
            if "content-length" in head:
                payload = await self.reader.readexactly(int(head["content-length"]))
            elif head.get("transfer-encoding") == "chunked":
                payload = b"".join([c async for c in self.chunks()])
            else:
                payload = await self.reader.read()
                await self.close()
            if head.get("connection") == "close":
                await self.close()
            return status, payload
        except BaseException:
            await self.close()
            raise

    async def events(self, path: str, headers: dict[str, str]) -> AsyncIterator[SseMessage]:
        """GET an SSE stream on this connection; yields events until the server ends it."""
        try:
            await self._send("GET", path, sse_headers(headers), b"")
            status, head = await self._head()
            if status != 200 or head.get("transfer-encoding") != "chunked":
                raise BenchError(f"SSE GET {path}: HTTP {status} {head}")
            buf = ""
            async for chunk in self.chunks():
                buf += chunk.decode()
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    event = parse_sse_block(block)
                    if event is not None:
                        yield event
        finally:
            await self.close()

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
