"""The fault proxy against a tiny local HTTP server: each mode does what it says, and only then."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.faultproxy import FaultProxy


class Target:
    """An HTTP/1.1 keep-alive server that answers `ok` and remembers what reached it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                target.requests.append((self.command, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_GET = do_PUT = _answer

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = ("127.0.0.1", self.server.server_address[1])
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def proxy(target: Target) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target.address, seed=3).start()
    yield proxy
    proxy.stop()


def connect(proxy: FaultProxy, timeout: float = 10) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def request(proxy: FaultProxy, method: str = "GET", body: bytes | None = None) -> bytes:
    conn = connect(proxy)
    try:
        conn.request(method, "/x", body=body)
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def test_pass_forwards_and_counts(proxy: FaultProxy, target: Target) -> None:
    assert request(proxy, "PUT", b"payload") == b"ok"
    assert target.requests == [("PUT", b"payload")]
    assert proxy.stats["connections"] == 1 and proxy.stats["faults"] == 0


def test_reset_resets_and_nothing_reaches_the_target(proxy: FaultProxy, target: Target) -> None:
    proxy.set_mode("reset")
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        request(proxy)
    assert target.requests == []
    assert proxy.stats["reset"] == 1 and proxy.stats["faults"] == 1


def test_http_503_answers_like_s3_under_load(proxy: FaultProxy, target: Target) -> None:
    proxy.set_mode("http_503")
    conn = connect(proxy)
    conn.request("PUT", "/x", body=b"z" * 8_000_000)  # more than socket buffers: drained
    resp = conn.getresponse()
    assert resp.status == 503 and resp.reason == "Slow Down"
    assert b"<Code>SlowDown</Code>" in resp.read()
    conn.close()
    assert target.requests == [] and proxy.stats["http_503"] == 1


def test_http_503_answers_an_expect_continue_request_at_once(proxy: FaultProxy) -> None:
    proxy.set_mode("http_503")
    conn = connect(proxy)
    conn.putrequest("PUT", "/x")
    conn.putheader("Content-Length", "1000")
    conn.putheader("Expect", "100-continue")
    conn.endheaders()  # the body is never sent, as a client waiting for 100 Continue does
    assert conn.getresponse().status == 503
    conn.close()


def test_stall_never_answers_until_the_mode_changes(proxy: FaultProxy, target: Target) -> None:
    proxy.set_mode("stall")
    conn = connect(proxy, timeout=0.5)
    conn.request("GET", "/x")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    assert target.requests == [] and proxy.stats["stall"] == 1
    proxy.set_mode("pass")  # releases the stalled connection with a reset
    assert request(proxy) == b"ok"


def test_stall_with_a_delay_answers_late(proxy: FaultProxy, target: Target) -> None:
    proxy.set_mode("stall", stall_seconds=0.5)
    started = time.monotonic()
    assert request(proxy) == b"ok"
    assert time.monotonic() - started >= 0.5  # held at least that long, by construction
    assert proxy.stats["stall"] == 1 and target.requests == [("GET", b"")]


def test_drop_response_lets_the_request_act_then_loses_the_answer(
    proxy: FaultProxy, target: Target
) -> None:
    proxy.set_mode("drop_response")
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        request(proxy, "PUT", b"acted on")
    assert target.requests == [("PUT", b"acted on")]
    assert proxy.stats["drop_response"] == 1


def test_down_refuses_then_listens_again_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.set_mode("down")
    with pytest.raises(ConnectionRefusedError):
        request(proxy)
    proxy.set_mode("pass")
    assert proxy.port == port and request(proxy) == b"ok"


def test_times_faults_the_next_connections_only(proxy: FaultProxy, target: Target) -> None:
    proxy.set_mode("reset", times=2)
    for _ in range(2):
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            request(proxy)
    assert request(proxy) == b"ok"
    assert proxy.mode == "pass" and proxy.stats["reset"] == 2 and len(target.requests) == 1


def test_a_fault_mode_resets_open_keep_alive_connections(proxy: FaultProxy) -> None:
    conn = connect(proxy)
    conn.request("GET", "/x")
    assert conn.getresponse().read() == b"ok"
    proxy.set_mode("http_503")
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        conn.request("GET", "/x")  # the same connection, kept alive: reset under it
        conn.getresponse()
    conn.close()


def test_mix_is_seeded_and_faults_about_the_rate(target: Target) -> None:
    def faults_of(seed: int) -> list[int]:
        proxy = FaultProxy(target.address, seed=seed).start()
        proxy.set_mode("mix", fault_rate=0.5)
        seen = []
        for _ in range(30):
            before = proxy.stats["faults"]
            with contextlib.suppress(OSError, http.client.HTTPException, AssertionError):
                request(proxy)
            seen.append(proxy.stats["faults"] - before)
        proxy.stop()
        return seen

    first = faults_of(5)
    assert first == faults_of(5)  # the same seed faults the same connections
    assert 0 < sum(first) < 30
    assert set(first) == {0, 1}


def test_set_mode_refuses_nonsense(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_mode("explode")
    with pytest.raises(ValueError):
        proxy.set_mode("down", times=1)


def test_runs_as_a_process_controlled_over_http(target: Target) -> None:
    host, port = target.address
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.faultproxy", "--target", f"{host}:{port}"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ports = json.loads(process.stdout.readline())
        control = f"http://127.0.0.1:{ports['control']}"
        proxy_conn = http.client.HTTPConnection("127.0.0.1", ports["port"], timeout=10)
        proxy_conn.request("GET", "/x")
        assert proxy_conn.getresponse().read() == b"ok"
        proxy_conn.close()
        with urllib.request.urlopen(f"{control}/mode?mode=reset&times=1") as resp:
            assert json.load(resp)["mode"] == "reset"
        proxy_conn = http.client.HTTPConnection("127.0.0.1", ports["port"], timeout=10)
        with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
            proxy_conn.request("GET", "/x")
            proxy_conn.getresponse()
        with urllib.request.urlopen(f"{control}/stats") as resp:
            stats = json.load(resp)
        assert stats["mode"] == "pass" and stats["reset"] == 1 and stats["connections"] == 2
    finally:
        process.terminate()
        process.wait(timeout=10)
