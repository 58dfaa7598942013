"""A fault-injecting TCP proxy for tests and the soak benchmark.

Sits in front of a real endpoint (moto's S3 server) and, per new connection, passes bytes
through or injects a fault:

* `pass`: forward both ways;
* `reset`: accept, then close with SO_LINGER 0 (the client sees ECONNRESET);
* `stall`: accept and never answer (the client's read timeout fires), or, with
  `stall_seconds`, hold the connection that long and then pass it through;
* `http_503`: answer the request with S3's `503 Slow Down` error and close; the request never
  reaches the target;
* `drop_response`: forward the request, let the target act on it, then reset the client before
  the answer reaches it (a lost response: the client retries what already happened);
* `down`: stop listening (connections are refused);
* `mix`: each new connection is faulted with probability `fault_rate` (a seeded RNG), with a
  fault drawn from `reset` and `http_503`, otherwise passed.

`times=N` limits a fault mode to the next N faulted connections, after which the proxy is back
to `pass`. Switching to a fault mode resets every open pass-through connection, so clients that
keep connections alive see the fault at once. `stats` counts connections and faults.

Runs in-process (`FaultProxy(...).start()`, thread-safe) or as a process:
`python -m tests.faultproxy --target 127.0.0.1:5000 --listen 0 --control 0` prints
`{"port": ..., "control": ...}` and is controlled with
`GET http://127.0.0.1:<control>/mode?mode=reset[&rate=0.2][&times=3][&stall=2.5]` and
`GET /stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

MODES = ("pass", "reset", "stall", "http_503", "drop_response", "down", "mix")
FAULTS = ("reset", "stall", "http_503", "drop_response")
MIX_FAULTS = ("reset", "http_503")
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERIM = b"HTTP/1.1 100"  # "100 Continue" answers an `Expect: 100-continue` request
MAX_DRAIN = 64 * 1024 * 1024


def _rst(sock: socket.socket) -> None:
    """Close so that the peer sees a reset, not an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        # Wakes a thread blocked reading it (sends nothing): the socket is released, and the
        # reset sent, only once no system call holds it any more.
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read a request head; returns (head, the body bytes that came with it)."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _final_response_begun(buffer: bytes) -> bool:
    """Has the target started its real answer (anything but an interim `100 Continue`)?"""
    if len(buffer) < len(INTERIM):
        return bool(buffer) and not INTERIM.startswith(buffer)
    return not buffer.startswith(INTERIM)


class FaultProxy:
    def __init__(self, target: tuple[str, int], *, port: int = 0, seed: int = 0) -> None:
        self.target = target
        self.mode = "pass"
        self.fault_rate = 0.0
        self.stall_seconds: float | None = None
        self.times_left: int | None = None
        self.generation = 0  # bumped by every set_mode: ends the stalls of the previous mode
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "faults": 0, **{fault: 0 for fault in FAULTS}}
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.port = port
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy")

    # -- control ------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(
        self,
        mode: str,
        fault_rate: float | None = None,
        *,
        times: int | None = None,
        stall_seconds: float | None = None,
    ) -> None:
        """Switch mode; `times` faults only the next N connections, then passes again."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if times is not None and (times < 1 or mode in ("pass", "down")):
            raise ValueError("times counts faulted connections: >= 1, and not for pass/down")
        with self.lock:
            self.mode = mode
            if fault_rate is not None:
                self.fault_rate = fault_rate
            self.times_left = times
            self.stall_seconds = stall_seconds
            self.generation += 1
            doomed = list(self._open) if mode != "pass" else []
            self._open.difference_update(doomed)
        for sock in doomed:
            _rst(sock)
        if mode == "down":
            self._close_listener()
        else:
            self._listen()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"mode": self.mode, "port": self.port, **self.stats}

    def stop(self) -> None:
        self._stop.set()
        self._close_listener()
        with self.lock:
            doomed = list(self._open)
            self._open.clear()
        for sock in doomed:
            _rst(sock)

    # -- plumbing -----------------------------------------------------------------------
    def _listen(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            listener.settimeout(0.1)
            self.port = listener.getsockname()[1]
            self._listener = listener

    def _close_listener(self) -> None:
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # stop listening now, even mid-accept
            listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                self._stop.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _choose(self) -> tuple[str, int]:
        """This connection's fault (or `pass`), and the generation of the mode that chose it."""
        with self.lock:
            self.stats["connections"] += 1
            mode = self.mode
            if mode == "mix":
                faulted = self.rng.random() < self.fault_rate
                mode = self.rng.choice(MIX_FAULTS) if faulted else "pass"
            if mode in FAULTS:
                self.stats["faults"] += 1
                self.stats[mode] += 1
                if self.times_left is not None:
                    self.times_left -= 1
                    if self.times_left == 0:
                        self.mode, self.times_left = "pass", None
            return mode, self.generation

    def _track(self, *socks: socket.socket) -> None:
        with self.lock:
            self._open.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self.lock:
            self._open.difference_update(socks)

    def _serve(self, client: socket.socket) -> None:
        mode, generation = self._choose()
        if mode in ("reset", "down"):
            _rst(client)
        elif mode == "stall":
            self._stall(client, generation)
        elif mode == "http_503":
            self._slow_down(client)
        elif mode == "drop_response":
            self._drop_response(client)
        else:
            self._pipe(client)

    def _stall(self, client: socket.socket, generation: int) -> None:
        self._track(client)
        delay = self.stall_seconds
        if delay is not None:
            # Hold the request unread, then serve it late (unless a mode switch reset it).
            self._stop.wait(delay)
            self._untrack(client)
            if client.fileno() != -1 and not self._stop.is_set():
                self._pipe(client)
            return
        client.settimeout(0.2)
        while not self._stop.is_set() and self.generation == generation:
            try:
                if not client.recv(65536):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        self._untrack(client)
        _rst(client)

    def _slow_down(self, client: socket.socket) -> None:
        """Answer like S3 under load: read the request (its body unless the client waits for
        `100 Continue`), send `503 Slow Down`, close in order so the answer arrives."""
        client.settimeout(5)
        with contextlib.suppress(OSError):
            head, body = _read_head(client)
            if _header(head, b"expect") is None:
                length = int(_header(head, b"content-length") or 0)
                remaining = min(length, MAX_DRAIN) - len(body)
                while remaining > 0 and (chunk := client.recv(min(remaining, 65536))):
                    remaining -= len(chunk)
            client.sendall(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(SLOW_DOWN)}\r\n".encode()
                + b"Connection: close\r\n\r\n"
                + SLOW_DOWN
            )
            client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            client.close()

    def _connect(self, client: socket.socket) -> socket.socket | None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _rst(client)
            return None
        upstream.settimeout(None)
        return upstream

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy one direction until its end, then pass the end on (a half close)."""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _pipe(self, client: socket.socket) -> None:
        upstream = self._connect(client)
        if upstream is None:
            return
        self._track(client, upstream)
        answers = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        answers.start()
        self._pump(client, upstream)
        answers.join()
        self._untrack(client, upstream)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.close()

    def _drop_response(self, client: socket.socket) -> None:
        upstream = self._connect(client)
        if upstream is None:
            return
        self._track(client, upstream)
        threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
        buffer = b""
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                buffer += data
                while buffer.startswith(INTERIM) and b"\r\n\r\n" in buffer:
                    interim, _, buffer = buffer.partition(b"\r\n\r\n")
                    client.sendall(interim + b"\r\n\r\n")  # let the client send its body
                if _final_response_begun(buffer):
                    break  # the target has acted on the request: lose its answer
        self._untrack(client, upstream)
        _rst(client)
        _rst(upstream)


def serve_control(proxy: FaultProxy, port: int) -> ThreadingHTTPServer:
    """A tiny HTTP control interface for a proxy running in its own process."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            status = 200
            body: dict[str, Any]
            if url.path == "/mode":
                try:
                    proxy.set_mode(
                        query.get("mode", "pass"),
                        float(query["rate"]) if "rate" in query else None,
                        times=int(query["times"]) if "times" in query else None,
                        stall_seconds=float(query["stall"]) if "stall" in query else None,
                    )
                    body = proxy.snapshot()
                except ValueError as exc:
                    status, body = 400, {"error": str(exc)}
            elif url.path == "/stats":
                body = proxy.snapshot()
            else:
                status, body = 404, {"error": "GET /mode?mode=... or /stats"}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fault-injecting TCP proxy")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--listen", type=int, default=0, help="proxy port (0: a free one)")
    parser.add_argument("--control", type=int, default=0, help="control port (0: a free one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the `mix` mode's RNG")
    args = parser.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), port=args.listen, seed=args.seed).start()
    control = serve_control(proxy, args.control)
    print(json.dumps({"port": proxy.port, "control": control.server_address[1]}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
