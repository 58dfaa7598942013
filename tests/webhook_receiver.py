"""A real HTTP receiver for webhook tests: a threaded `http.server` on 127.0.0.1 that records
every request and answers from a per-path script of status codes (200 once it runs out)."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    redirect_to: str = ""
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    wrap_tls: Callable[[ssl.SSLContext], None] = lambda _: None

    def script(self, path: str, *statuses: int) -> None:
        """Answer the next requests to `path` with `statuses`, in order."""
        with self.lock:
            self.scripts[path] = list(statuses)

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.on(path)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {len(self.on(path))} of {count} requests arrived")
            time.sleep(0.1)
        return self.on(path)


@contextmanager
def webhook_receiver() -> Iterator[Receiver]:
    receiver = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if receiver.delay:
                time.sleep(receiver.delay)
            with receiver.lock:
                script = receiver.scripts.get(self.path, [])
                status = script.pop(0) if script else 200
                receiver.requests.append(
                    Received(
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                        status=status,
                        at=time.time(),
                    )
                )
            try:
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.redirect_to or "/redirected")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender gave up waiting (a timeout test)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"

    def wrap_tls(context: ssl.SSLContext) -> None:
        """Serve HTTPS from now on (the URL keeps its port; its scheme is the caller's)."""
        server.socket = context.wrap_socket(server.socket, server_side=True)

    receiver.wrap_tls = wrap_tls
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
