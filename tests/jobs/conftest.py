"""The whole service as separate processes: a uvicorn API, the beat, and Celery workers, on a
real Postgres database, Redis (broker and pub/sub) and S3 over HTTP (moto's server).

`stack` is one such stack per test module, on the test timings (`TEST_TIMINGS`: 4 s leases,
1 s sweeps). `start_stack` starts more, with overrides, from a test body or a fixture:

    def test_something(start_stack):
        with start_stack(LEASE_SECONDS="2") as stack:
            stack.start_worker(S3_ENDPOINT_URL=proxy.url)
            ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests import services
from tests.harness import (
    FAST_SPEC,
    ROOT,
    TEST_TIMINGS,
    MotoS3,
    ServiceStack,
    addition_rows,
    service_stack,
    stop_process,
)

__all__ = ["FAST_SPEC", "ROOT", "ServiceStack", "StartStack", "addition_rows", "stop"]

StartStack = Callable[..., AbstractContextManager[ServiceStack]]
stop = stop_process  # the tests' name for it


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def start_stack(
    tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3, base_model_dir: Path
) -> StartStack:
    """`start_stack(**env)`: a context manager for a new services stack on the test timings,
    with `env` on top for every process (the API and beat included)."""

    def start(**env: str) -> AbstractContextManager[ServiceStack]:
        services.require("Postgres", services.postgres_available())
        services.require("Redis", services.redis_available())
        return service_stack(
            tmp_path_factory.mktemp("stack"),
            s3=moto_s3,
            model_dir=base_model_dir,
            env={**TEST_TIMINGS, **env},
        )

    return start


@pytest.fixture(scope="module")
def stack(start_stack: StartStack) -> Iterator[ServiceStack]:
    with start_stack() as svc:
        yield svc
