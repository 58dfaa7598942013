"""`start_stack`: a second services stack with overrides, beside the module's `stack`."""

from __future__ import annotations

import pytest

from tests.harness import addition_rows
from tests.jobs.conftest import ServiceStack, StartStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_stack_with_overrides_runs_beside_the_module_stack(
    stack: ServiceStack, start_stack: StartStack
) -> None:
    with start_stack(LEASE_SECONDS="2") as other:
        assert other.settings.lease_seconds == 2 and stack.settings.lease_seconds == 4
        assert other.env["BROKER_URL"] != stack.env["BROKER_URL"]  # its own Redis database
        assert other.settings.database_url != stack.settings.database_url
        for svc in (stack, other):
            headers = svc.new_tenant("beside")
            assert svc.upload(headers, addition_rows(4, seed=1)).startswith("file-")
        other_url, api = other.url, other.process("api")
        assert api is not None
    assert api.poll() is not None  # stopped on the way out
    with stack.http() as c:
        assert c.get("/healthz").status_code == 200
    assert other_url != stack.url
