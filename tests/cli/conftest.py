"""The installed `qlora` command against a real services stack: the jobs tests' stack fixtures
(a uvicorn API, the beat, Celery workers on Postgres, Redis and moto's S3 server)."""

from tests.jobs.conftest import base_model_dir, stack, start_stack

__all__ = ["base_model_dir", "stack", "start_stack"]
