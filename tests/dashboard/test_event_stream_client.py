"""The dashboard's SSE client (fetch() streaming, Last-Event-ID resume) under Node's own test
runner: tests/dashboard/event_stream.test.mjs imports api/static/js/api.js as the page does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import services

HERE = Path(__file__).resolve().parent


def test_the_event_stream_client_resumes_with_last_event_id() -> None:
    node = shutil.which("node")
    if node is None:
        if services.REQUIRE_SERVICES:
            pytest.fail("REQUIRE_SERVICES=1 but node is not installed (make assets needs it too)")
        pytest.skip("node is not installed: this test runs the dashboard SSE module in node")
    result = subprocess.run(
        [node, "--test", str(HERE / "event_stream.test.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 3" in result.stdout
